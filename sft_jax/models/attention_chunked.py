"""`xla_chunked`: the reference over query blocks, skipping invisible keys.

Query block i (rows [i*C, (i+1)*C), C = T/4 clamped to [128, 512]) attends only to the key range that can
be visible to it, which in train mode (index causality) is static:

  keys [max(0, i*C - window + 1), (i+1)*C)   (window = 0: from key 0)

so a causal layer computes about half of T x S and a sliding-window layer
about (C + window) x T (Gemma-3's 512 window at 4096 tokens, C = 512: 42%
of the causal work, 12% of dense). Each block runs under jax.checkpoint: the backward pass
recomputes its logits, so peak memory is one [B, N, G, C, S_i] block.

Any T works: queries (and, in train mode, keys) are padded to a multiple of C
with segment 0, which no real query sees, and the padded rows are dropped.
In cache mode positions decide causality, nothing static is known, and every
block sees all S keys. A traced window cannot skip either.
"""

import jax
import jax.numpy as jnp

from sft_jax.models import attention as attention_lib

_CHUNK = 512  # largest query block
# Smallest block when splitting short rows: rows of up to 2048 tokens still
# get 4 blocks, so causal skipping saves >= 3/8 of the work there too.
_MIN_CHUNK = 128


def key_range(block: int, chunk: int, window, s: int) -> tuple[int, int]:
  """Train mode: the [lo, hi) key indices query block `block` may see."""
  hi = min((block + 1) * chunk, s)
  lo = 0
  if isinstance(window, int) and window > 0:
    lo = max(0, block * chunk - window + 1)
  return lo, hi


def _pad_to(x, length: int):
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)


def xla_chunked(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                kv_pos_BxS, kv_seg_BxS, *, window, softcap, scale, mode):
  """Blockwise attention; same numbers as attention.reference."""
  b, t, h, d = q_BxTxHxK.shape
  chunk = min(_CHUNK, max(_MIN_CHUNK, -(-t // 4)), t)
  blocks = -(-t // chunk)
  tp = blocks * chunk
  q_ord, kv_ord = attention_lib.order(q_pos_BxT, kv_pos_BxS, mode)
  q_BxTxHxK, q_ord, q_seg_BxT = (_pad_to(x, tp) for x in (q_BxTxHxK, q_ord,
                                                          q_seg_BxT))
  if mode == "train":
    # Keys are the queries' tokens: pad them alike; their order is index.
    k_BxSxNxK, v_BxSxNxK, kv_seg_BxS = (
        _pad_to(x, tp) for x in (k_BxSxNxK, v_BxSxNxK, kv_seg_BxS))
    kv_ord = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
  s = k_BxSxNxK.shape[1]

  block_fn = (lambda q, qo, qs, k, v, ko, ks: attention_lib.reference(
      q, k, v, qo, qs, ko, ks, window, softcap, scale))
  if blocks > 1:
    # Only the current block's logits live at a time: the backward pass
    # recomputes them. One block gains nothing from that.
    block_fn = jax.checkpoint(block_fn)
  outs = []
  for i in range(blocks):
    rows = slice(i * chunk, (i + 1) * chunk)
    lo, hi = key_range(i, chunk, window, s) if mode == "train" else (0, s)
    keys = slice(lo, hi)
    outs.append(block_fn(q_BxTxHxK[:, rows], q_ord[:, rows],
                         q_seg_BxT[:, rows], k_BxSxNxK[:, keys],
                         v_BxSxNxK[:, keys], kv_ord[:, keys],
                         kv_seg_BxS[:, keys]))
  out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)
  return out[:, :t]


IMPLEMENTATIONS = {"xla_chunked": xla_chunked}
