"""The `sft-jax` command line: one sub-command per job.

Each sub-command lives in its own module and exposes `main(argv) -> int`; this
file only dispatches, importing lazily so `sft-jax --help` stays fast and a
sub-command pays only for what it uses.

It is also the one place where errors become exit codes (`sft_jax/errors.py`):
a user error is one line `sft-jax COMMAND: <what>: <where>: <reason>` and exit
code 2; a traceback only for a bug, or for anything with `--debug`.
"""

import importlib
import logging
import os
import sys
import traceback

from sft_jax import errors

# name -> (module:function, one-line help)
_COMMANDS = {
    "train": ("sft_jax.train.cli:main",
              "fine-tune a model from a config; resumes from --workdir"),
    "score": ("sft_jax.score:main",
              "log-probabilities of completions / ranking of candidates"),
    "distill-cache": ("sft_jax.train.distill_cache:main",
                      "run a config's distill.teacher once: top-k log-probs"),
    "data": ("sft_jax.data.cli:main",
             "data tools: `data dump` (tokens and masks), `data inspect`"),
    "generate": ("sft_jax.infer.cli:generate_main",
                 "generate text from a model or a run"),
    "chat": ("sft_jax.infer.cli:chat_main", "interactive chat with a model"),
    "eval": ("sft_jax.infer.cli:eval_main",
             "evaluate a run by generation (exact match, ROUGE-L, BLEU, JSON)"),
    "export": ("sft_jax.infer.cli:export_main",
               "export a run to Hugging Face format (merged or PEFT adapter)"),
    "bench": ("sft_jax.train.bench:main",
              "benchmark the train step: tokens/s, MFU, memory, compile time"),
    "plan": ("sft_jax.train.plan:main",
             "per-device memory of a config's run, and whether it fits"),
    "sweep": ("sft_jax.sweep:main",
              "run every point of an experiment's sweep, then summarise"),
    "demo": ("sft_jax.demo:main",
             "the embedded end-to-end demo (no downloads)"),
}


def _usage() -> str:
  lines = ["usage: sft-jax COMMAND [ARGS...]", "", "commands:"]
  for name, (_, text) in _COMMANDS.items():
    lines.append(f"  {name:<14}{text}")
  lines += ["", "options of every command:",
            "  --debug     a full traceback for every error (also "
            "SFT_JAX_DEBUG=1)",
            "  --verbose   library log messages (absl, Orbax) on the console",
            "", "exit codes: 0 finished, 1 bug (traceback), 2 user error "
            "(one line),",
            "  3 train stopped on a non-finite loss, 4 another process of a "
            "multi-host run",
            "  failed (rerun to resume), 75 train preempted (SIGTERM/Ctrl-C;",
            "  saved, rerun to resume), 130 interrupted outside training.",
            "", "Run `sft-jax COMMAND --help` for a command's options."]
  return "\n".join(lines)


def _global_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
  """Takes --debug / --verbose out of `argv` (not after a `--`)."""
  end = argv.index("--") if "--" in argv else len(argv)
  head, tail = argv[:end], argv[end:]
  debug = "--debug" in head or os.environ.get("SFT_JAX_DEBUG", "") not in (
      "", "0")
  verbose = "--verbose" in head
  head = [a for a in head if a not in ("--debug", "--verbose")]
  return head + tail, debug, verbose


class _CommandFormatter(logging.Formatter):
  def __init__(self, command: str):
    super().__init__()
    self._prefix = f"sft-jax {command}"

  def format(self, record):
    return (f"{self._prefix}: {record.levelname.lower()}: "
            f"{record.getMessage()}")


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time (it may be replaced)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def _setup_logging(command: str, verbose: bool) -> None:
  """One logger ("sft_jax") prefixed with the command; libraries quiet."""
  log = logging.getLogger("sft_jax")
  handlers = [h for h in log.handlers if isinstance(h, _StderrHandler)]
  if not handlers:
    handlers = [_StderrHandler()]
    log.addHandler(handlers[0])
  handlers[0].setFormatter(_CommandFormatter(command))
  log.setLevel(logging.INFO if verbose else logging.WARNING)
  log.propagate = False
  # absl (and Orbax, which logs through it) speaks at INFO/WARNING about its
  # own bookkeeping; only errors reach the console unless --verbose.
  level = logging.INFO if verbose else logging.ERROR
  for name in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(level)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity("info" if verbose else "error")
  except ImportError:
    pass


def run_command(name: str, func, argv: list[str], *, debug: bool) -> int:
  """Runs one command's main, turning errors into the one exit contract."""
  try:
    return int(func(argv) or 0)
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"sft-jax {name}: interrupted", file=sys.stderr, flush=True)
    return errors.EXIT_INTERRUPTED
  except errors.PeerFailedError as e:
    if debug:
      traceback.print_exc()
    print(f"sft-jax {name}: {e.what}: {' '.join(str(e).split())}",
          file=sys.stderr, flush=True)
    return _exit_after_peer_failure(errors.EXIT_PEER_FAILED)
  except Exception as e:  # pylint: disable=broad-except
    user = errors.user_error_of(e)
    distributed = sys.modules.get("sft_jax.train.distributed")
    if user is None and distributed is not None:
      distributed.after_error(e)  # a failed peer exits there, in one line
    if user is None:
      traceback.print_exc()
      print(f"sft-jax {name}: internal error ({type(e).__name__}); this is a "
            "bug, please report it with the traceback above", file=sys.stderr)
      return errors.EXIT_BUG
    if debug:
      traceback.print_exc()
    # One line, whatever a library put in the message.
    message = " ".join(str(user).split())
    print(f"sft-jax {name}: {user.what}: {message}", file=sys.stderr,
          flush=True)
    return errors.EXIT_USAGE


def _exit_after_peer_failure(code: int) -> int:
  distributed = sys.modules.get("sft_jax.train.distributed")
  return code if distributed is None else (
      distributed.exit_after_peer_failure(code))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, debug, verbose = _global_flags(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in _COMMANDS:
    print(f"sft-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  from sft_jax import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.set_default_gpu_flags()  # before any sub-command imports jax
  module_name, func_name = _COMMANDS[name][0].split(":")
  _setup_logging(name, verbose)
  func = getattr(importlib.import_module(module_name), func_name)
  return run_command(name, func, rest, debug=debug)
