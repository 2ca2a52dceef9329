"""The model of a run: its config, and its variables created in their shards.

  model_cfg = model_config(cfg)                   # from model.path or hf_config
  model_cfg, variables = load_or_init_model(cfg, mesh)

Weights are loaded (safetensors, straight into their shardings) or initialised
under jit with `out_shardings`, so no full replicated copy ever exists.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from sft_jax import models
from sft_jax.models import quant
from sft_jax.train import sharding

METHODS = ("full", "freeze", "lora", "qlora")  # config method.name values


def _read_hf_config(path: str) -> dict:
  if os.path.isdir(path):
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f)
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  with open(huggingface_hub.hf_hub_download(path, "config.json")) as f:
    return json.load(f)


def model_config(cfg: config_dict.ConfigDict) -> "models.ModelConfig":
  """The ModelConfig of `cfg.model` with its runtime options and LoRA."""
  if cfg.model.path:
    hf = _read_hf_config(cfg.model.path)
  elif cfg.model.hf_config:
    hf = json.loads(cfg.model.hf_config)
  else:
    raise ValueError("config: set model.path (HF dir or hub id) or "
                     "model.hf_config (JSON of HF config fields)")
  if cfg.method.name not in METHODS:
    raise ValueError(f"config method.name: unknown {cfg.method.name!r} "
                     f"({' | '.join(METHODS)})")
  lora, fmt = None, ""
  if cfg.method.name == "qlora":
    fmt = cfg.method.qlora.format
    if fmt not in quant.FORMATS:
      raise ValueError(f"config method.qlora.format: unknown {fmt!r} "
                       f"({' | '.join(quant.FORMATS)})")
  if cfg.method.name in ("lora", "qlora"):
    lora = models.LoraConfig(rank=cfg.method.lora.rank,
                             alpha=cfg.method.lora.alpha,
                             rslora=cfg.method.lora.rslora,
                             targets=cfg.method.lora.targets,
                             dropout=cfg.method.lora.dropout)
  base = models.ModelConfig.from_hf_config(hf)
  if fmt:
    _check_block(cfg.method.qlora.block_size, base)
  return dataclasses.replace(
      base, dtype=cfg.model.dtype,
      param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers,
      remat=cfg.model.remat, attention_impl=cfg.model.attention,
      lora=lora, quant=fmt, quant_block=cfg.method.qlora.block_size,
      quant_double=cfg.method.qlora.double_quant)


def _check_block(block: int, m: "models.ModelConfig") -> None:
  """Every quantized kernel's input rows must split into blocks."""
  rows = {m.hidden_size, m.intermediate_size, m.num_heads * m.head_dim}
  bad = sorted(r for r in rows if block <= 0 or block % 2 or r % block)
  if bad:
    raise ValueError(f"config method.qlora.block_size={block}: must be even "
                     f"and divide every kernel's input rows ({sorted(rows)}); "
                     f"{bad} do not split")


def variable_shardings(cfg: config_dict.ConfigDict,
                       model_cfg: "models.ModelConfig",
                       mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(shapes, shardings) of the model variables, without allocating them."""
  rules = sharding.rules_from_config(cfg.sharding.rules)
  return _shapes_and_shardings(model_cfg, mesh, tuple(rules.items()))


@functools.lru_cache(maxsize=16)
def _shapes_and_shardings(model_cfg, mesh, rules: tuple):
  shapes = jax.eval_shape(functools.partial(models.init, model_cfg),
                          jax.random.key(0))
  axes = models.logical_axes(model_cfg)
  return shapes, sharding.tree_shardings(axes, shapes, mesh, dict(rules))


@functools.lru_cache(maxsize=16)
def _jitted_init(model_cfg, mesh, rules: tuple, collection: str | None):
  """A jitted `models.init` straight into shards, cached per model and mesh.

  With `collection`, only that part is returned, so XLA drops the rest of
  the initialisation (e.g. "lora" alone next to loaded base weights).
  """
  _, shardings = _shapes_and_shardings(model_cfg, mesh, rules)
  if collection is None:
    return jax.jit(functools.partial(models.init, model_cfg),
                   out_shardings=shardings)
  return jax.jit(lambda rng: models.init(model_cfg, rng)[collection],
                 out_shardings=shardings[collection])


def load_or_init_model(cfg: config_dict.ConfigDict, mesh: jax.sharding.Mesh
                       ) -> tuple["models.ModelConfig", dict]:
  """(model_cfg, variables) with every array created directly in its shards.

  `model.init == "pretrained"` loads `model.path` (safetensors) straight into
  the shardings; "random" (or no path) initialises from `cfg.seed` under jit
  with `out_shardings`. LoRA adapters are initialised the same way (B = 0, so
  the model starts equal to the base).
  """
  if cfg.model.init not in ("pretrained", "random"):
    raise ValueError(f"config model.init: unknown {cfg.model.init!r} "
                     "(pretrained | random)")
  model_cfg = model_config(cfg)
  rules = tuple(sharding.rules_from_config(cfg.sharding.rules).items())
  _, shardings = _shapes_and_shardings(model_cfg, mesh, rules)
  rng = jax.random.key(cfg.seed)
  if cfg.model.init == "random" or not cfg.model.path:
    variables = _jitted_init(model_cfg, mesh, rules, None)(rng)
    if "lora" in variables and cfg.method.lora.init_adapter:
      variables["lora"] = _init_lora(cfg, model_cfg, mesh, rules, rng,
                                     shardings["lora"])
    return model_cfg, variables
  _, params = _load_base(cfg, model_cfg, mesh, rules, shardings["params"])
  variables = {"params": params}
  if "lora" in shardings:
    variables["lora"] = _init_lora(cfg, model_cfg, mesh, rules, rng,
                                   shardings["lora"])
  return model_cfg, variables


def _load_base(cfg, model_cfg, mesh, rules, param_shardings):
  """load_hf into the shardings; under qlora each layer kernel is quantized
  as soon as it is read, so at most one full-precision tensor exists."""
  if not model_cfg.quant:
    return models.load_hf(cfg.model.path, dtype=cfg.model.param_dtype,
                          shardings=param_shardings)
  plain_cfg = dataclasses.replace(model_cfg, quant="", lora=None)
  _, plain = _shapes_and_shardings(plain_cfg, mesh, rules)
  quantized = dict(_flat_items(param_shardings))
  fmt, block = model_cfg.quant, model_cfg.quant_block
  double = model_cfg.quant_double

  def quantize_leaf(path, x):
    if not quant.quantizes(path):
      return x
    out = {k[len(path) + 1:]: s for k, s in quantized.items()
           if k.startswith(path + "/")}
    return jax.jit(lambda w: quant.quantize(w, fmt, block, double),
                   out_shardings=out)(x)

  return models.load_hf(cfg.model.path, dtype=cfg.model.param_dtype,
                        shardings=plain["params"], leaf_fn=quantize_leaf)


def _flat_items(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_items(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def _init_lora(cfg, model_cfg, mesh, rules, rng, lora_shardings):
  """Fresh adapters (B = 0), or `method.lora.init_adapter`'s PEFT weights."""
  if not cfg.method.lora.init_adapter:
    return _jitted_init(model_cfg, mesh, rules, "lora")(rng)
  # Imported here: only runs when continuing from an existing adapter.
  from sft_jax.infer import export  # pylint: disable=g-import-not-at-top
  lora = export.load_peft_adapter(cfg.method.lora.init_adapter, model_cfg)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(
          x.shape, s, lambda idx, x=x: np.asarray(x)[idx]),
      lora, lora_shardings)
