"""Frozen-base bytes per device for Llama-3.1-8B on one device, from shapes only.

LoRA over the bf16 base, QLoRA NF4, and QLoRA NF4 with double quantization.
Run from the repository root: `python scripts/frozen_base_bytes.py`.
"""
import math, jax
from sft_jax.train import config as config_lib, model_setup, sharding, step as step_lib
for extra in ([], ["--config.method.name=qlora"], ["--config.method.name=qlora", "--config.method.qlora.double_quant=true"]):
  cfg = config_lib.load_config("configs/presets/llama3_8b.py:method=lora", extra)
  cfg.model.path = ""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  mc = model_setup.model_config(cfg)
  shapes, sh = model_setup.variable_shardings(cfg, mc, mesh)
  _, frozen = step_lib.split_trainable(cfg, shapes)
  flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
  tot = sum(math.prod(x.shape) * x.dtype.itemsize for _, x in flat)
  layers = sum(math.prod(x.shape) * x.dtype.itemsize for p, x in flat if "layers" in jax.tree_util.keystr(p))
  print(extra, "frozen GiB", round(tot / 2**30, 3), "layer kernels+norms GiB", round(layers / 2**30, 3))
