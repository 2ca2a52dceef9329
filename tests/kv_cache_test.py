"""Decoding writes the KV cache in place: no whole-cache copy per token."""

import jax
import jax.numpy as jnp

from sft_jax import models

_HF = dict(model_type="llama", vocab_size=64, hidden_size=32,
           intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
           rope_theta=1e4, max_position_embeddings=4096,
           tie_word_embeddings=False)


def test_decode_steps_keep_temporaries_below_one_cache():
  cfg = models.ModelConfig.from_hf_config(_HF)
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
  # One layer's k and v are read out for attention (1/4 of the cache here);
  # a scan that re-stacks the cache per token needs several whole copies.
  assert temp < 0.5 * cache_bytes, (temp, cache_bytes)
