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
    impl: "xla" (reference, runs everywhere).

  Returns:
    [B, T, H, K] in q's dtype.
  """
  if impl != "xla":
    raise ValueError(f"unknown attention impl {impl!r}; available: xla")
  b, t, h, d = q_BxTxHxK.shape
  n = k_BxSxNxK.shape[2]
  if h % n:
    raise ValueError(f"{h} query heads do not group over {n} kv heads")
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
