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
exactly where it stopped (same batches, same updates). SIGTERM or Ctrl-C
saves a checkpoint after the current step and exits with code 75 (a second
Ctrl-C exits at once). A resume onto a different base model, tokenizer, chat
template or architecture is refused (--allow-resume-change overrides); one
that changes train.steps needs --schedule-on-resume.

Every config value, the model and tokenizer sources and the data files are
checked before anything is loaded; a problem is one line naming the file,
line or key, with exit code 2.

exit codes: 0 finished, 1 bug, 2 user error, 3 non-finite loss,
4 another process of a multi-host run failed or hung (rerun to resume),
75 preempted (saved; rerun to resume).

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
  p.add_argument("--allow-resume-change", action="store_true",
                 help="resume even though the base model, tokenizer, chat "
                      "template or architecture differ from the run's start "
                      "(refused otherwise: it would silently continue "
                      "another run)")
  p.add_argument("--schedule-on-resume",
                 choices=("keep", "stretch", "restart"), default=None,
                 help="required when a resume changes train.steps: `keep` "
                      "continues the original learning-rate schedule (past "
                      "its end the lr stays at its final value); `stretch` "
                      "recomputes it over the new length (the lr jumps); "
                      "`restart` warms up and decays again from the resume "
                      "step to the new train.steps")
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
  # before importing anything that might (loading the config touches none).
  cfg = config_lib.load_config(args.config, overrides)
  from sft_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator, args.num_processes,
                         args.process_id,
                         cfg.distributed.heartbeat_timeout_s)
  distributed.start_watchdog(cfg.distributed.heartbeat_timeout_s, "train")

  # Every value is checked before anything is loaded or written.
  from sft_jax import errors  # pylint: disable=g-import-not-at-top
  from sft_jax.train import validate  # pylint: disable=g-import-not-at-top
  validate.validate(cfg)
  errors.check_writable_dir(args.workdir)

  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  from sft_jax.train import distill  # pylint: disable=g-import-not-at-top
  distill.check_config(cfg)
  result = loop.train(cfg, args.workdir, progress=not args.no_progress,
                      resume_change=args.allow_resume_change,
                      schedule_on_resume=args.schedule_on_resume)
  return result.exit_code
