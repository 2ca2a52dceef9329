"""Every config value checked before anything is loaded or written.

`validate(cfg)` raises a ConfigError (or a UserError for a model/tokenizer
source) naming the key, so a typo fails in milliseconds, before seconds of
loading and before a half-made run directory.
"""

import os

from ml_collections import config_dict

from sft_jax import errors
from sft_jax import preflight
from sft_jax.data import config as data_config
from sft_jax.data.errors import DataError
from sft_jax.train.config import ConfigError

_CHOICES = {
    "model.init": ("pretrained", "random"),
    "method.name": ("full", "freeze", "lora"),
    "optim.name": ("adamw", "sgd", "lion", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.on_nonfinite": ("stop", "skip"),
    "checkpoint.best_mode": ("min", "max"),
    "eval.early_stop_mode": ("min", "max"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.seq_len",
             "train.grad_accum", "train.ce_chunk", "eval.batch_size",
             "log.every_steps", "method.lora.rank")
_NON_NEGATIVE = ("optim.lr", "optim.warmup_steps", "optim.weight_decay",
                 "optim.clip_norm", "checkpoint.every_steps",
                 "checkpoint.keep", "eval.every_steps", "train.z_loss")


def _get(cfg: config_dict.ConfigDict, key: str):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def validate(cfg: config_dict.ConfigDict, *, sources: bool = True) -> None:
  """Raises on the first bad value; see the module docstring.

  sources: also check the model, tokenizer and data files (False where they
  live on another machine, e.g. a sweep printing commands for a cluster).
  """
  for key, choices in _CHOICES.items():
    value = _get(cfg, key)
    if value not in choices:
      raise ConfigError(f"{key}={value!r}: expected one of "
                        f"{' | '.join(choices)}")
  for key in _POSITIVE:
    if _get(cfg, key) < 1:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be >= 1")
  for key in _NON_NEGATIVE:
    if _get(cfg, key) < 0:
      raise ConfigError(f"{key}={_get(cfg, key)}: must be >= 0")
  t = cfg.train
  if t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not a multiple of "
        f"train.grad_accum={t.grad_accum}; choose a grad_accum that divides "
        "it")
  if sources:
    _check_mesh(cfg)
  if cfg.checkpoint.best_metric and cfg.eval.every_steps == 0:
    raise ConfigError(f"checkpoint.best_metric={cfg.checkpoint.best_metric!r}"
                      " needs evaluations: set eval.every_steps > 0")
  if cfg.eval.early_stop_metric and cfg.eval.every_steps == 0:
    raise ConfigError(f"eval.early_stop_metric="
                      f"{cfg.eval.early_stop_metric!r} needs evaluations: "
                      "set eval.every_steps > 0")
  if cfg.eval.generate and not cfg.eval.generate_data:
    raise ConfigError("eval.generate=True needs eval.generate_data (a JSONL "
                      "file of records with reference answers)")

  model = cfg.model
  if model.init == "pretrained" and not model.path:
    raise ConfigError("model.path is empty: give an HF checkpoint directory "
                      "or hub id (or set model.init=random with "
                      "model.hf_config)")
  if model.init == "random" and not model.path and not model.hf_config:
    raise ConfigError("model.hf_config is empty: model.init=random with no "
                      "model.path needs the HF config fields as JSON")
  if not sources:
    return
  if model.init == "pretrained":
    preflight.check_model_dir(model.path, "model.path")
  tokenizer = cfg.data.tokenizer or model.path
  if not tokenizer:
    raise ConfigError("data.tokenizer is empty (and model.path too, whose "
                      "tokenizer is the default): set data.tokenizer (e.g. "
                      "FILE.py:tokenizer=DIR for a config with that knob, or "
                      "--config.data.tokenizer=DIR)")
  preflight.check_tokenizer_source(
      tokenizer, "data.tokenizer" if cfg.data.tokenizer else "model.path")
  if cfg.method.lora.init_adapter:
    adapter = os.path.expanduser(cfg.method.lora.init_adapter)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
      raise ConfigError(f"method.lora.init_adapter={adapter}: no "
                        "adapter_config.json there")

  try:
    data_config.validate(cfg.data)
  except DataError as e:
    raise ConfigError(_data_hint(str(e))) from None
  if not cfg.data.sources:
    raise ConfigError("data.sources is empty: declare at least one training "
                      "source")
  for group in ("sources", "eval_sources"):
    for name, src in cfg.data[group].items():
      _check_source_files(f"data.{group}.{name}.path", src.path)


def _check_mesh(cfg: config_dict.ConfigDict) -> None:
  """The mesh fits the devices, and each data shard gets whole micro-batches
  (the step's own check, made before any loading)."""
  import jax  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  try:
    data, fsdp, _ = sharding.mesh_shape(cfg.mesh, jax.device_count())
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  t = cfg.train
  if t.batch_size % (data * fsdp * t.grad_accum):
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not a multiple of mesh.data x "
        f"mesh.fsdp x train.grad_accum ({data} x {fsdp} x {t.grad_accum} on "
        f"{jax.device_count()} devices); raise the batch or shrink the mesh")


def _data_hint(message: str) -> str:
  if message.endswith(".path is empty"):
    return (message + ": set the source's file (--config."
            + message.split(" ")[0][:-len(".path")] + ".path=FILE, or a "
            "config knob such as configs/tiny.py:data=FILE)")
  return message


def _check_source_files(key: str, path: str) -> None:
  """Local source files exist and are not empty (hub ids are left alone)."""
  from sft_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    files, _ = sources.resolve(path)
  except DataError as e:
    raise errors.UserError(f"{key}: {e}", what="data") from None
  for f in files:
    if os.path.getsize(f) == 0:
      raise errors.UserError(f"{key}: {f}: the file is empty; give a file "
                             "with at least one record", what="data")
