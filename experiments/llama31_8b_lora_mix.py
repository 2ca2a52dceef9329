"""Llama-3.1-8B-Instruct, LoRA SFT on text-to-SQL, swept over the general share.

Study: how much general chat data must be mixed into a domain SFT set to keep
the model's general ability (held-out UltraChat loss) while it learns the
domain (held-out text-to-SQL loss and exact match)? Each sweep point sets the
share s of general data in the training stream: domain weight 1 - s, general
weight s (weights are normalised by the data pipeline).

Data (hub ids; the model is gated: accept its licence and set HF_TOKEN):
  domain   gretelai/synthetic_text_to_sql (Apache-2.0): sql_prompt + sql_context
           -> sql, as alpaca records; held-out: its "test" split.
  general  HuggingFaceH4/ultrachat_200k (MIT): multi-turn chat, "messages";
           held-out: "test_sft".

  sft-jax sweep experiments/llama31_8b_lora_mix.py --workdir runs/l8b_mix
  sft-jax train --config experiments/llama31_8b_lora_mix.py:general=0.25 \
      --workdir runs/l8b_g25          # one point by itself

Knobs (`:KNOB=VALUE,...`): general (share of general data), steps, rank, lr.
Sized for a TPU v5p-16 / 8xH100 node: global batch 64 x 4096 tokens.
"""

import pathlib

from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib

BASE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
SHARES = (0.0, 0.1, 0.25, 0.5)
# The sweep table and plot: domain skill and general-data loss side by side.
SUMMARY_METRICS = ("train/loss", "eval/domain/loss", "eval/general/loss")


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, general=0.25, steps=2000, rank=16,
                               lr=2e-4)
  c = config_lib.get_config_from_file(str(BASE))
  c.model.path = "meta-llama/Llama-3.1-8B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"

  c.method.name = "lora"
  c.method.lora.rank = knobs.rank
  c.method.lora.alpha = 2.0 * knobs.rank
  c.method.lora.targets = (
      r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")

  c.optim.lr = knobs.lr
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  c.train.steps = knobs.steps
  c.train.batch_size = 64
  c.train.seq_len = 4096
  c.train.ce_chunk = 4096

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  sql_fields = dict(instruction="sql_prompt", input="sql_context",
                    output="sql")
  domain = dict(path="gretelai/synthetic_text_to_sql", format="alpaca")
  general = dict(path="HuggingFaceH4/ultrachat_200k", format="messages")
  c.data.sources.domain = data_config.source_config(
      split="train", weight=1.0 - knobs.general, **domain)
  c.data.sources.domain.fields.update(sql_fields)
  c.data.sources.general = data_config.source_config(
      split="train_sft", weight=knobs.general, **general)
  c.data.eval_sources.domain = data_config.source_config(
      split="test", max_records=1000, **domain)
  c.data.eval_sources.domain.fields.update(sql_fields)
  c.data.eval_sources.general = data_config.source_config(
      split="test_sft", max_records=1000, **general)
  c.data.packing = "best_fit"

  c.eval.every_steps = 200  # both held-out sets: the sweep's two axes
  c.eval.batch_size = 64
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "eval/domain/loss"
  c.log.every_steps = 10
  return c


def get_sweep(arg=None):
  del arg
  return [{"data.sources.general.weight": s,
           "data.sources.domain.weight": 1.0 - s} for s in SHARES]
