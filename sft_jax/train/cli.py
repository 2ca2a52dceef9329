"""`sft-jax train`: fine-tune a model from a config into a run directory."""

import argparse
import sys

_DESCRIPTION = """\
Fine-tune a causal LM from a Python config, writing a run directory:

  DIR/config.json      the resolved config
  DIR/tokenizer/       the tokenizer, with the exact chat template used
  DIR/checkpoints/     Orbax checkpoints (train state + data position)
  DIR/metrics.jsonl    one JSON record per logged step
  DIR/tb/              TensorBoard events (scalars and hyperparameters)

Any config key can be overridden with --config.KEY=VALUE (e.g.
--config.optim.lr=2e-4); an unknown key or a value of the wrong type is an
error that names the key.

When DIR already holds a checkpoint the run resumes from the latest one,
exactly where it stopped (same batches, same updates). SIGTERM saves a
checkpoint and exits cleanly.

Multi-host: on TPU pods, SLURM and Open MPI jobs every process is found
automatically; elsewhere start each process with --coordinator,
--num-processes and --process-id.
"""

_EPILOG = """\
examples (offline, from the repository root; configs/tiny.py ships its data):
  sft-jax train --config configs/tiny.py --workdir runs/tiny
  sft-jax train --config configs/tiny.py:method=lora --workdir runs/tiny_lora \\
      --config.train.epochs=2 --config.method.lora.dropout=0.1 \\
      --config.eval.on_start=true --config.eval.every_steps=10

a real model (downloaded from the hub once):
  sft-jax train --config configs/presets/llama3_1b.py:method=lora \\
      --workdir runs/l1b --config.optim.lr=2e-4 --config.train.steps=500
"""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="sft-jax train", description=_DESCRIPTION, epilog=_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="config file with get_config(arg), optionally followed "
                      "by :ARG knobs, e.g. configs/tiny.py:method=lora")
  p.add_argument("--workdir", required=True, metavar="DIR",
                 help="run directory; resumes when it holds a checkpoint")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="multi-host: address of process 0")
  p.add_argument("--num-processes", type=int, metavar="N",
                 help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, metavar="I",
                 help="multi-host: this process's index in [0, N)")
  p.add_argument("--no-progress", action="store_true",
                 help="no console progress bar (log lines instead)")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # `--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides are passed on to
  # the config loader, which checks the key and the type.
  # The config module does not import jax, so it may come before
  # jax.distributed starts.
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  overrides, rest = config_lib.split_argv(argv)
  args = _parser().parse_args(rest)

  # jax.distributed must start before any device is touched, so this comes
  # before importing anything that might.
  from sft_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator, args.num_processes,
                         args.process_id)

  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    cfg = config_lib.load_config(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"sft-jax train: {e}", file=sys.stderr)
    return 2
  result = loop.train(cfg, args.workdir, progress=not args.no_progress)
  return result.exit_code
