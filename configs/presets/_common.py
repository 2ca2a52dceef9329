"""Shared shape of the model presets: base config + one HF architecture.

Each preset names a hub id (`model.path`, downloaded on first use) and also
carries the architecture as `model.hf_config`, so `sft-jax bench` and the
config tests run offline. Knobs (`preset.py:KNOB=VALUE,...`):
  method=full|lora   full fine-tuning or LoRA (r=16, alpha=32, all linears)
  data=FILES         training records (comma-free path or glob)
  steps=N            optimizer steps

Batch shapes are set for ONE accelerator: train.batch_size rows of
train.seq_len tokens per step, in train.grad_accum micro-batches. On D
data-parallel devices keep batch_size and divide grad_accum by D (the
micro-batch must give every device whole rows).
"""

import json
import pathlib

from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib


def preset(arg, *, hub_id: str, hf_config: dict, full_lr: float,
           lora_lr: float = 2e-4, remat: str = "none",
           full_param_dtype: str = "float32", batch_size: int = 32,
           grad_accum: int = 8, seq_len: int = 4096):
  knobs = config_lib.parse_arg(arg, method="full", data="", steps=1000)
  c = config_lib.get_config_from_file(
      str(pathlib.Path(__file__).parents[1] / "base.py"))
  c.model.path = hub_id
  c.model.hf_config = json.dumps(hf_config)
  c.model.dtype = "bfloat16"
  c.model.remat = remat
  c.method.name = knobs.method
  if knobs.method == "lora":
    # The frozen base in bf16: half the memory, and no fp32 master copy is
    # needed for weights that never change.
    c.model.param_dtype = "bfloat16"
    c.method.lora.rank = 16
    c.method.lora.alpha = 32.0
    c.optim.lr = lora_lr
  elif knobs.method == "full":
    c.model.param_dtype = full_param_dtype
    c.optim.lr = full_lr
  else:
    raise config_lib.ConfigError(f"preset arg method={knobs.method!r}: "
                                 "expected full or lora")
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = max(1, knobs.steps // 30)
  c.optim.end_lr_ratio = 0.1
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.0 if knobs.method == "lora" else 0.01
  c.train.steps = knobs.steps
  c.train.batch_size = batch_size
  c.train.grad_accum = grad_accum
  c.train.seq_len = seq_len
  # Per device a chunk holds rows x ce_chunk x V float32 logits: 4 rows x
  # 512 x 128k x 4 B = 1 GB.
  c.train.ce_chunk = 512
  c.data.sources.train = data_config.source_config(path=knobs.data)
  return c
