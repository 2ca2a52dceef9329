"""Mistral-7B-v0.3 (mistralai/Mistral-7B-v0.3): full or LoRA, packed 4096."""

import pathlib

from sft_jax.train import config as config_lib

HF_CONFIG = dict(
    model_type="mistral", vocab_size=32768, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    max_position_embeddings=32768, tie_word_embeddings=False,
    rope_theta=1000000.0, sliding_window=None, bos_token_id=1,
    eos_token_id=2)


def get_config(arg=None):
  common = config_lib.import_file(
      pathlib.Path(__file__).with_name("_common.py"))
  return common.preset(arg, hub_id="mistralai/Mistral-7B-v0.3",
                       hf_config=HF_CONFIG, full_lr=1e-5, remat="full",
                       batch_size=64, grad_accum=16)
