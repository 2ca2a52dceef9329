"""Gemma-3-1B (google/gemma-3-1b-pt): full or LoRA, packed 4096.

Sliding-window layers (512) with a global layer every 6th, tied 262k vocab.
"""

import pathlib

from sft_jax.train import config as config_lib

HF_CONFIG = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
    intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
    max_position_embeddings=32768, tie_word_embeddings=True,
    query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
    rope_theta=1000000.0, rope_local_base_freq=10000.0,
    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    attn_logit_softcapping=None, bos_token_id=2, eos_token_id=1)


def get_config(arg=None):
  common = config_lib.import_file(
      pathlib.Path(__file__).with_name("_common.py"))
  return common.preset(arg, hub_id="google/gemma-3-1b-pt",
                       hf_config=HF_CONFIG, full_lr=2e-5,
                       remat="dots_with_no_batch_dims_saveable",
                       batch_size=32, grad_accum=8)
