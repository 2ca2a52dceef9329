"""Llama-3.2-1B (meta-llama/Llama-3.2-1B): full or LoRA, packed 4096."""

import pathlib

from sft_jax.train import config as config_lib

HF_CONFIG = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    max_position_embeddings=131072, tie_word_embeddings=True,
    rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                      high_freq_factor=4.0,
                      original_max_position_embeddings=8192))


def get_config(arg=None):
  common = config_lib.import_file(
      pathlib.Path(__file__).with_name("_common.py"))
  return common.preset(arg, hub_id="meta-llama/Llama-3.2-1B",
                       hf_config=HF_CONFIG, full_lr=2e-5,
                       remat="dots_with_no_batch_dims_saveable",
                       batch_size=32, grad_accum=8)
