"""Tiny CPU config: a 2-layer Llama-shaped model, trains in seconds.

Runs as shipped: `sft-jax train --config configs/tiny.py --workdir runs/tiny`
trains a random tiny Llama on the sample data in configs/tiny_data/ (chat,
alpaca and prompt/completion records, and a 320-token tokenizer; made by
scripts/make_tiny_data.py), with nothing downloaded.

Used by the tests and the README. Knobs (`configs/tiny.py:KNOB=VALUE,...`):
  model=DIR      a HF checkpoint dir to fine-tune ("" = random tiny Llama)
  data=FILE      training records (JSONL/Parquet/...; any data format;
                 "" = the three sample files in configs/tiny_data/)
  tokenizer=DIR  tokenizer ("" = the model's, or configs/tiny_data/tokenizer
                 for the random model)
  method=NAME    full | freeze | lora | qlora (freeze trains the top layer only)
  steps=N        optimizer steps
"""

import json
import pathlib

from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib

TINY_DATA = pathlib.Path(__file__).resolve().with_name("tiny_data")
# A Llama with GQA 4:2, sized for the tiny test tokenizer (300 tokens).
TINY_LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0)


def get_config(arg=None):
  knobs = config_lib.parse_arg(arg, model="", data="", tokenizer="",
                               method="full", steps=40)
  c = config_lib.get_config_from_file(
      str(pathlib.Path(__file__).with_name("base.py")))
  c.model.path = knobs.model
  c.model.init = "pretrained" if knobs.model else "random"
  c.model.hf_config = json.dumps(TINY_LLAMA)
  c.model.dtype = "float32"  # CPU: float32 compute keeps tests exact.

  c.method.name = knobs.method
  if knobs.method == "freeze":
    c.method.trainable = r"^layers/"
    c.method.train_top_layers = 1
  c.method.lora.rank = 4
  c.method.lora.alpha = 8.0

  c.optim.lr = 3e-3 if knobs.method in ("lora", "qlora") else 1e-3
  c.optim.warmup_steps = 4
  c.optim.weight_decay = 0.01

  c.train.steps = knobs.steps
  c.train.batch_size = 8
  c.train.seq_len = 64
  c.train.ce_chunk = 32

  c.data.tokenizer = knobs.tokenizer
  if not knobs.tokenizer and not knobs.model:
    c.data.tokenizer = str(TINY_DATA / "tokenizer")
  if knobs.data:
    c.data.sources.train = data_config.source_config(path=knobs.data)
  else:
    for name in ("chat", "alpaca", "prompt_completion"):
      c.data.sources[name] = data_config.source_config(
          path=str(TINY_DATA / f"{name}.jsonl"))
    c.data.eval_sources.heldout = data_config.source_config(
        path=str(TINY_DATA / "eval.jsonl"))
  c.data.packing_bins = 8
  return c
