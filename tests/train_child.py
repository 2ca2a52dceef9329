"""`sft-jax train` in a child process that a test interrupts on cue.

  python tests/train_child.py --signal KILL --at-step 8 --after-checkpoint 4 \
      -- --config ... --workdir DIR

Runs the real CLI; once the metrics of step `--at-step` have been fetched
(and, if given, once checkpoint `--after-checkpoint` is committed on disk) the
process sends itself SIGKILL (no cleanup at all, like a lost machine) or
SIGTERM (a preemption notice the loop must honour) or SIGINT (Ctrl-C, which
the loop honours the same way).
"""

import argparse
import os
import signal
import sys
import time

from sft_jax import cli as sft_cli
from sft_jax.train import host_metrics


def main() -> int:
  split = sys.argv.index("--")
  parser = argparse.ArgumentParser()
  parser.add_argument("--signal", choices=("KILL", "TERM", "INT"), required=True)
  parser.add_argument("--at-step", type=int, required=True)
  parser.add_argument("--after-checkpoint", type=int)
  args = parser.parse_args(sys.argv[1:split])
  train_argv = sys.argv[split + 1:]
  workdir = train_argv[train_argv.index("--workdir") + 1]
  signum = getattr(signal, f"SIG{args.signal}")

  finish = host_metrics.HostMetrics.finish

  def finish_then_signal(self, step, metrics, *rest):
    out = finish(self, step, metrics, *rest)
    if step == args.at_step:
      if args.after_checkpoint is not None:
        path = os.path.join(workdir, "checkpoints", str(args.after_checkpoint))
        deadline = time.time() + 120
        while not os.path.isdir(path) and time.time() < deadline:
          time.sleep(0.05)
      os.kill(os.getpid(), signum)
    return out

  host_metrics.HostMetrics.finish = finish_then_signal
  return sft_cli.main(["train", *train_argv])


if __name__ == "__main__":
  sys.exit(main())
