"""Attention with packing, positions and sliding windows as one mask rule.

A query attends to a key iff they share a segment, the key is not padding
(segment 0) and the key's position is not after the query's:

  (seg_q == seg_k) & (seg_k != 0) & (pos_k <= pos_q) [& (pos_q - pos_k < window)]

Causality is by position within a segment, so a packed row equals its
sequences run separately, and the same rule serves a KV cache whose slots
carry their own positions and segment ids. Faster backends (splash, cuDNN
flash) plug in as another `impl` with the same signature.
"""

import jax
import jax.numpy as jnp

# Finite, so that a query with no visible key (padding) softmaxes to a
# uniform row instead of NaN; such rows are never supervised.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS,
                   window=None):
  """Boolean mask [B, T, S]; `window` (scalar, maybe traced) <= 0 = none."""
  q_pos = q_pos_BxT[:, :, None]
  k_pos = kv_pos_BxS[:, None, :]
  mask = ((q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :])
          & (kv_seg_BxS[:, None, :] != 0) & (k_pos <= q_pos))
  if window is not None:
    mask &= (window <= 0) | (q_pos - k_pos < window)
  return mask


def _xla(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
         kv_seg_BxS, window, softcap, scale):
  """Reference: materialises float32 logits [B, N, G, T, S]."""
  b, t, h, d = q_BxTxHxK.shape
  n = k_BxSxNxK.shape[2]
  q_BxTxNxGxK = q_BxTxHxK.reshape(b, t, n, h // n, d)
  logits_BxNxGxTxS = jnp.einsum(
      "btngk,bsnk->bngts", q_BxTxNxGxK, k_BxSxNxK,
      preferred_element_type=jnp.float32) * scale
  if softcap:
    logits_BxNxGxTxS = jnp.tanh(logits_BxNxGxTxS / softcap) * softcap
  mask_BxTxS = attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS,
                              window)
  logits_BxNxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxNxGxTxS,
                               _MASKED)
  probs = jax.nn.softmax(logits_BxNxGxTxS, axis=-1).astype(v_BxSxNxK.dtype)
  out_BxTxNxGxK = jnp.einsum("bngts,bsnk->btngk", probs, v_BxSxNxK)
  return out_BxTxNxGxK.reshape(b, t, h, d)


_CHUNK = 512


def _xla_chunked(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                 kv_pos_BxS, kv_seg_BxS, window, softcap, scale):
  """The reference over query blocks of _CHUNK, each rematerialised in the
  backward pass: peak memory [B, N, G, _CHUNK, S] instead of T x S."""
  b, t, h, d = q_BxTxHxK.shape
  if t <= _CHUNK or t % _CHUNK:
    return _xla(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                kv_pos_BxS, kv_seg_BxS, window, softcap, scale)
  c = t // _CHUNK

  @jax.checkpoint
  def one(chunk):
    q, pos, seg = chunk
    return _xla(q, k_BxSxNxK, v_BxSxNxK, pos, seg, kv_pos_BxS, kv_seg_BxS,
                window, softcap, scale)

  def blocks(x):  # [B, T, ...] -> [C, B, _CHUNK, ...]
    x = x.reshape((b, c, _CHUNK) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  out_CxBxTcxHxK = jax.lax.map(
      one, (blocks(q_BxTxHxK), blocks(q_pos_BxT), blocks(q_seg_BxT)))
  return jnp.moveaxis(out_CxBxTcxHxK, 0, 1).reshape(b, t, h, d)


# impl name -> function with _xla's signature. A faster backend (splash,
# cuDNN or Pallas flash attention) registers here and becomes selectable by
# ModelConfig.attention_impl.
IMPLEMENTATIONS = {"xla": _xla, "xla_chunked": _xla_chunked}


def attention(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
              kv_pos_BxS, kv_seg_BxS, *, window=None, softcap=None,
              scale: float, impl: str = "xla"):
  """Grouped-query attention, softmax in float32.

  Args:
    q_BxTxHxK: queries (rotary already applied).
    k_BxSxNxK, v_BxSxNxK: keys and values, H a multiple of N.
    q_pos_BxT, q_seg_BxT: query positions and segment ids (int32).
    kv_pos_BxS, kv_seg_BxS: key positions and segment ids (0 = empty slot).
    window: sliding window (int or traced int32 scalar); None or <= 0 = full.
    softcap: if set, logits become softcap * tanh(logits / softcap).
    scale: multiplies q.k before the cap.
    impl: a key of IMPLEMENTATIONS: "xla" (reference, runs everywhere) or
      "xla_chunked" (same numbers, less memory for long sequences).

  Returns:
    [B, T, H, K] in q's dtype.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention impl {impl!r}; available: "
                     f"{', '.join(IMPLEMENTATIONS)}")
  h, n = q_BxTxHxK.shape[2], k_BxSxNxK.shape[2]
  if h % n:
    raise ValueError(f"{h} query heads do not group over {n} kv heads")
  return IMPLEMENTATIONS[impl](q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT,
                               q_seg_BxT, kv_pos_BxS, kv_seg_BxS, window,
                               softcap, scale)
