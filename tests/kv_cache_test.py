"""Decoding writes the KV cache in place: no whole-cache copy per token."""

import jax
import jax.numpy as jnp
import pytest

from sft_jax import models

_HF = dict(model_type="llama", vocab_size=64, hidden_size=32,
           intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
           rope_theta=1e4, max_position_embeddings=4096,
           tie_word_embeddings=False)


# Gemma-3-like layers (2 local to 1 global, then 1 more): the cache is the
# carry of two scans, the 3-layer groups and the last layer.
_GEMMA3 = dict(_HF, model_type="gemma3_text", num_hidden_layers=7,
               sliding_window=16, sliding_window_pattern=3,
               query_pre_attn_scalar=8, layer_types=None)


@pytest.mark.parametrize("hf", [_HF, _GEMMA3], ids=["llama", "gemma3"])
def test_decode_steps_keep_temporaries_below_one_cache(hf):
  cfg = models.ModelConfig.from_hf_config(hf)
  variables = models.init(cfg, jax.random.key(0))
  model = models.Transformer(cfg)
  cache = models.init_cache(cfg, 2, 2048)

  def decode(variables, cache):  # 8 one-token steps, cache as loop carry
    def body(i, cache):
      tok = jnp.ones((2, 1), jnp.int32)
      _, cache = model.apply(variables, tok, tok * i, tok, cache=cache,
                             cache_index=i)
      return cache
    return jax.lax.fori_loop(0, 8, body, cache)

  compiled = jax.jit(decode, donate_argnums=1).lower(variables,
                                                     cache).compile()
  cache_bytes = cache["k"].nbytes + cache["v"].nbytes
  temp = compiled.memory_analysis().temp_size_in_bytes
  # One layer's k and v are read out for attention (1/L of the cache);
  # a scan that re-stacks the cache per token needs several whole copies.
  assert temp < 0.5 * cache_bytes, (temp, cache_bytes)
