"""Qwen2.5-7B-Instruct, full SFT on grade-school maths, general share x lr.

Study: full fine-tuning forgets faster than LoRA; does mixing general chat
back in protect the general-data loss, and does the best learning rate depend
on the mix? Sweep: the share s of general data (domain weight 1 - s, general
weight s) crossed with two peak learning rates.

Data (hub ids):
  domain   openai/gsm8k "main" (MIT): question -> worked answer ending in
           "#### N", as prompt_completion rendered through the chat template;
           held-out: its "test" split.
  general  HuggingFaceH4/ultrachat_200k (MIT): "messages"; held-out:
           "test_sft".

  sft-jax sweep experiments/qwen25_7b_full_mix.py --workdir runs/q7b_mix
  sft-jax sweep experiments/qwen25_7b_full_mix.py --workdir W --dry-run

Knobs (`:KNOB=VALUE,...`): general, steps, lr.
Full SFT keeps fp32 master weights and AdamW state (16 bytes/param, ~120 GB
for 7.6B params) sharded over the fsdp axis: use >= 8 H100s or a v5p-16.
"""

import pathlib

from sft_jax import sweep
from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib

BASE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
SUMMARY_METRICS = ("train/loss", "eval/domain/loss", "eval/general/loss")


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, general=0.25, steps=1500, lr=1e-5)
  c = config_lib.get_config_from_file(str(BASE))
  c.model.path = "Qwen/Qwen2.5-7B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"

  c.method.name = "full"

  c.optim.lr = knobs.lr
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train.steps = knobs.steps
  c.train.batch_size = 64
  c.train.seq_len = 4096
  c.train.ce_chunk = 4096

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  gsm8k = dict(path="openai/gsm8k", subset="main", format="prompt_completion")
  gsm8k_fields = dict(prompt="question", completion="answer")
  general = dict(path="HuggingFaceH4/ultrachat_200k", format="messages")
  c.data.sources.domain = data_config.source_config(
      split="train", weight=1.0 - knobs.general, **gsm8k)
  c.data.sources.domain.fields.update(gsm8k_fields)
  c.data.sources.general = data_config.source_config(
      split="train_sft", weight=knobs.general, **general)
  c.data.eval_sources.domain = data_config.source_config(
      split="test", **gsm8k)
  c.data.eval_sources.domain.fields.update(gsm8k_fields)
  c.data.eval_sources.general = data_config.source_config(
      split="test_sft", max_records=1000, **general)
  c.data.packing = "best_fit"

  c.eval.every_steps = 150  # both held-out sets: the sweep's two axes
  c.eval.batch_size = 64
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "eval/domain/loss"
  c.log.every_steps = 10
  return c


def get_sweep(arg=None):
  del arg
  mixes = [{"data.sources.general.weight": s,
            "data.sources.domain.weight": 1.0 - s}
           for s in (0.0, 0.1, 0.25, 0.5)]
  # Every mix at both learning rates.
  return [dict(mix, **lr) for mix in mixes
          for lr in sweep.grid({"optim.lr": [5e-6, 2e-5]})]
