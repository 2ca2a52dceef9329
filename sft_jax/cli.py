"""The `sft-jax` command line: one sub-command per job.

Each sub-command lives in its own module and exposes `main(argv) -> int`; this
file only dispatches, importing lazily so `sft-jax --help` stays fast and a
sub-command pays only for what it uses.
"""

import importlib
import sys

# name -> (module:function, one-line help)
_COMMANDS = {
    "train": ("sft_jax.train.cli:main",
              "fine-tune a model from a config; resumes from --workdir"),
    "score": ("sft_jax.score:main",
              "log-probabilities of completions / ranking of candidates"),
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
    lines.append(f"  {name:<10}{text}")
  lines += ["", "Run `sft-jax COMMAND --help` for a command's options."]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in _COMMANDS:
    print(f"sft-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name, func_name = _COMMANDS[name][0].split(":")
  func = getattr(importlib.import_module(module_name), func_name)
  return int(func(rest) or 0)
