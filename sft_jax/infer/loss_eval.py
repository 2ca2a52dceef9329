"""Loss, perplexity and token accuracy of any model on any data, per source.

`sft-jax eval --metrics loss,perplexity,token_accuracy` lands here. The data
goes through the training pipeline (render, mask, pack): for a run directory
with the run's own data options (chat template, fields, mask policy, packing,
sequence length), so the numbers are those training's eval would log; for a
Hugging Face model with the defaults of configs/base.py.
"""

import os
from typing import Any

from ml_collections import config_dict

# --metrics name -> the eval metric suffix (sft_jax.train.evaluate).
METRICS = {"loss": "loss", "perplexity": "perplexity",
           "token_accuracy": "accuracy"}


def parse_data(specs: list[str]) -> dict[str, str]:
  """["[NAME=]FILE", ...] -> {name: file}; the name defaults to the stem."""
  out = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep:
      name, path = os.path.splitext(os.path.basename(spec))[0], spec
    if not name or not path:
      raise ValueError(f"--data {spec!r}: expected FILE or NAME=FILE")
    if name in out:
      raise ValueError(f"--data: two sets named {name!r}; name them with "
                       "NAME=FILE")
    out[name] = path
  return out


def data_config(files: dict[str, str], run_config: Any = None
                ) -> config_dict.ConfigDict:
  """The data section that evaluates `files` (or the run's eval sources).

  A file inherits the options of the run's sources (format, fields, mask,
  prompt rendering) when they agree, else the declared defaults.
  """
  from sft_jax.data import config as data_lib  # pylint: disable=g-import-not-at-top
  if run_config is None:
    cfg = data_lib.default_config()
  else:
    cfg = config_dict.ConfigDict(run_config.data.to_dict())
  template = None
  if run_config is not None:
    sources = list(cfg.eval_sources.values()) or list(cfg.sources.values())
    options = {repr({k: s[k].to_dict() if k == "fields" else s[k] for k in (
        "format", "fields", "mask", "prompt_as_user_turn")}) for s in sources}
    if len(options) == 1:
      template = sources[0]
  if files or run_config is None:
    cfg.eval_sources = config_dict.ConfigDict()
    for name, path in files.items():
      src = data_lib.source_config(path=path)
      if template is not None:
        for k in ("format", "fields", "mask", "prompt_as_user_turn"):
          src[k] = template[k]
      cfg.eval_sources[name] = src
  if not cfg.eval_sources:
    raise ValueError("no data to evaluate: give --data FILE (the run has no "
                     "data.eval_sources)")
  cfg.sources = config_dict.ConfigDict()
  return cfg


def evaluate(loaded, files: dict[str, str], *, seq_len: int | None,
             batch_size: int, ce_chunk: int = 512) -> tuple[dict, int]:
  """({set: {metric: value}} plus "all" pooled, seq_len) of `loaded`."""
  from sft_jax import data  # pylint: disable=g-import-not-at-top
  from sft_jax.train import evaluate as train_eval  # pylint: disable=g-import-not-at-top
  run_cfg = loaded.config
  cfg = data_config(files, run_cfg)
  if seq_len is None:
    seq_len = run_cfg.train.seq_len if run_cfg is not None else 2048
  if run_cfg is not None:
    ce_chunk = run_cfg.train.ce_chunk
  batches = data.make_eval_batches(cfg, loaded.tokenizer, seq_len=seq_len,
                                   batch_size=batch_size)
  flat = train_eval.loss_metrics(loaded.model_cfg, loaded.variables, batches,
                                 ce_chunk=min(ce_chunk, seq_len))
  out = {}
  for name in list(batches) + ["all"]:
    prefix = "eval" if name == "all" else f"eval/{name}"
    out[name] = {m: flat[f"{prefix}/{k}"] for m, k in METRICS.items()}
    out[name]["tokens"] = flat[f"{prefix}/tokens"]
  return out, seq_len
