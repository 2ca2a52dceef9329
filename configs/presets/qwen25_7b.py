"""Qwen2.5-7B (Qwen/Qwen2.5-7B): full or LoRA, packed 4096."""

import pathlib

from sft_jax.train import config as config_lib

HF_CONFIG = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=131072,
    tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False,
    sliding_window=131072, max_window_layers=28, bos_token_id=151643,
    eos_token_id=151643)


def get_config(arg=None):
  common = config_lib.import_file(
      pathlib.Path(__file__).with_name("_common.py"))
  return common.preset(arg, hub_id="Qwen/Qwen2.5-7B", hf_config=HF_CONFIG,
                       full_lr=1e-5, remat="full",
                       batch_size=64, grad_accum=16)
