"""`xla_chunked`: the reference over query blocks, skipping invisible keys.

Query block i (rows [i*C, (i+1)*C), C = T/4 clamped to [128, 512]) attends
only to the key range that can be visible to it, which in train mode (index
causality) is static:

  keys [max(0, i*C - window + 1), (i+1)*C)   (window = 0: from key 0)

so a causal layer computes about half of T x S and a sliding-window layer
about (C + window) x T (Gemma-3's 512 window at 4096 tokens, C = 512: 42%
of the causal work, 12% of dense). Each block has a flash-attention style
custom VJP: only its output and softmax row max/sum are saved, the backward
pass recomputes its logits, so peak memory is one [B, N, G * C, S_i] block.

Any T works: queries (and, in train mode, keys) are padded to a multiple of C
with segment 0, which no real query sees, and the padded rows are dropped.
In cache mode positions decide causality, nothing static is known, and every
block sees all S keys. A traced window cannot skip either.
"""

import functools

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


# Inside a block everything is head-major: q rows M = (G, C) of one kv head,
# keys S. Every matmul is then [M, K] x [K, N] or [M, K] x [N, K] over the
# batch (B, N): the forms XLA:CPU hands to its GEMM without copying the
# [M, S]-sized operand into a transposed layout; the gradients that contract
# over M (dk, dv) are computed transposed, as [K, S], from small transposes
# of q and dout.


_barrier = jax.lax.optimization_barrier


def _logits(q_BxNxMxK, k_BxNxSxK, softcap, scale):
  """Scaled (and capped) float32 logits [B, N, M, S]."""
  s_BxNxMxS = jnp.einsum("bnmk,bnsk->bnms", q_BxNxMxK, k_BxNxSxK,
                         preferred_element_type=jnp.float32) * scale
  if softcap:
    s_BxNxMxS = jnp.tanh(s_BxNxMxS / softcap) * softcap
  return s_BxNxMxS


def _visible(mask_BxCxS, groups):
  """[B, C, S] -> [B, 1, M, S] (M = G * C), broadcast over the kv heads."""
  b, c, s = mask_BxCxS.shape
  return jnp.broadcast_to(mask_BxCxS[:, None], (b, groups, c, s)).reshape(
      b, 1, groups * c, s)


def _block_fwd(q_BxNxMxK, k_BxNxSxK, v_BxNxSxK, mask_BxCxS, softcap, scale):
  groups = q_BxNxMxK.shape[2] // mask_BxCxS.shape[1]
  s = _logits(q_BxNxMxK, k_BxNxSxK, softcap, scale)
  s = jnp.where(_visible(mask_BxCxS, groups), s, attention_lib.MASKED)
  max_BxNxM = jnp.max(s, axis=-1)
  p_BxNxMxS = jnp.exp(s - max_BxNxM[..., None])
  sum_BxNxM = jnp.sum(p_BxNxMxS, axis=-1)
  out_BxNxMxK = jnp.einsum("bnms,bnsk->bnmk",
                           p_BxNxMxS.astype(v_BxNxSxK.dtype), v_BxNxSxK,
                           preferred_element_type=jnp.float32)
  out_BxNxMxK = out_BxNxMxK / sum_BxNxM[..., None]
  return out_BxNxMxK.astype(q_BxNxMxK.dtype), (max_BxNxM, sum_BxNxM)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block(q_BxNxMxK, k_BxNxSxK, v_BxNxSxK, mask_BxCxS, softcap, scale):
  """One query block over its keys: softmax(mask(q k^T)) v, [B, N, M, K].

  The backward pass is the flash-attention one: it recomputes the logits
  from q and k, rebuilds the probabilities in one elementwise pass from the
  saved row max and sum, and never differentiates through max/sum/divide.
  Only the block's output and the row max and sum [B, N, M] are saved (not
  log-sum-exp: a row with no visible key has max -0.7 * float32 max, which
  absorbs log(S)).
  """
  return _block_fwd(q_BxNxMxK, k_BxNxSxK, v_BxNxSxK, mask_BxCxS, softcap,
                    scale)[0]


def _block_vjp_fwd(q, k, v, mask, softcap, scale):
  out, (row_max, row_sum) = _block_fwd(q, k, v, mask, softcap, scale)
  return out, (q, k, v, mask, out, row_max, row_sum)


def _block_vjp_bwd(softcap, scale, residuals, dout_BxNxMxK):
  q, k, v, mask_BxCxS, out, max_BxNxM, sum_BxNxM = residuals
  visible_Bx1xMxS = _visible(mask_BxCxS, q.shape[2] // mask_BxCxS.shape[1])
  s = _logits(q, k, softcap, scale)
  p_BxNxMxS = jnp.exp(jnp.where(visible_Bx1xMxS, s, attention_lib.MASKED)
                      - max_BxNxM[..., None]) / sum_BxNxM[..., None]
  dout = dout_BxNxMxK.astype(jnp.float32)
  dout_BxNxKxM = jnp.swapaxes(dout, 2, 3)
  dv_BxNxKxS = _barrier(jnp.einsum("bnkm,bnms->bnks", dout_BxNxKxM,
                                    p_BxNxMxS))
  dp_BxNxMxS = jnp.einsum("bnmk,bnsk->bnms", dout, v,
                          preferred_element_type=jnp.float32)
  # sum_s p * dp = sum_k out * dout: the softmax's backward without a pass.
  delta_BxNxM = jnp.sum(out.astype(jnp.float32) * dout, axis=-1)
  # Masked logits are constants: no gradient, also in rows with no visible
  # key (uniform p there).
  ds = jnp.where(visible_Bx1xMxS,
                 p_BxNxMxS * (dp_BxNxMxS - delta_BxNxM[..., None]), 0.0)
  if softcap:
    # s is the capped logit: d(c tanh(x / c)) / dx = 1 - (s / c)^2.
    ds = ds * (1.0 - jnp.square(s / softcap))
  ds_BxNxMxS = ds * scale
  dq = jnp.einsum("bnms,bnsk->bnmk", ds_BxNxMxS, k,
                  preferred_element_type=jnp.float32)
  q_BxNxKxM = jnp.swapaxes(q, 2, 3).astype(jnp.float32)
  dk_BxNxKxS = _barrier(jnp.einsum("bnkm,bnms->bnks", q_BxNxKxM,
                                    ds_BxNxMxS))
  return (dq.astype(q.dtype), jnp.swapaxes(dk_BxNxKxS, 2, 3).astype(k.dtype),
          jnp.swapaxes(dv_BxNxKxS, 2, 3).astype(v.dtype), None)


_block.defvjp(_block_vjp_fwd, _block_vjp_bwd)


def _join(blocks_BxNxCxK, chunk: int, lo: int, hi: int):
  """Keys [lo, hi) of the key blocks (each `chunk` long), joined on axis 2."""
  pieces = []
  for j in range(lo // chunk, -(-hi // chunk)):
    a, z = max(lo, j * chunk) - j * chunk, min(hi, (j + 1) * chunk) - j * chunk
    x = blocks_BxNxCxK[j]
    pieces.append(x if (a, z) == (0, chunk) else x[:, :, a:z])
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=2)


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

  n = k_BxSxNxK.shape[2]
  g = h // n
  q_BxNxGxTxK = q_BxTxHxK.reshape(b, tp, n, g, d).transpose(0, 2, 3, 1, 4)
  k_BxNxSxK, v_BxNxSxK = (x.transpose(0, 2, 1, 3) for x in (k_BxSxNxK,
                                                           v_BxSxNxK))
  # Blocks by split, each block's keys joined from the key blocks: the
  # gradients are then concatenates and block-sized sums. Slicing the full
  # tensors instead differentiates into one zero-padded full-length dq / dk
  # / dv per block, all summed.
  q_blocks = jnp.split(q_BxNxGxTxK, blocks, axis=3)
  if mode == "train":
    k_blocks, v_blocks = (jnp.split(x, blocks, axis=2)
                          for x in (k_BxNxSxK, v_BxNxSxK))
    keys_of = lambda x_blocks, lo, hi: _join(x_blocks, chunk, lo, hi)
  else:  # every query block sees all S keys
    keys_of = lambda x, lo, hi: x
    k_blocks, v_blocks = k_BxNxSxK, v_BxNxSxK
  outs = []
  for i in range(blocks):
    rows = slice(i * chunk, (i + 1) * chunk)
    lo, hi = key_range(i, chunk, window, s) if mode == "train" else (0, s)
    keys = slice(lo, hi)
    mask_BxCxS = attention_lib.attention_mask(
        q_ord[:, rows], q_seg_BxT[:, rows], kv_ord[:, keys],
        kv_seg_BxS[:, keys], window)
    q_BxNxMxK = q_blocks[i].reshape(b, n, g * chunk, d)
    out = _block(q_BxNxMxK, keys_of(k_blocks, lo, hi),
                 keys_of(v_blocks, lo, hi), mask_BxCxS, softcap, scale)
    outs.append(out.reshape(b, n, g, chunk, d))
  out_BxNxGxTxK = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
  return out_BxNxGxTxK.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


IMPLEMENTATIONS = {"xla_chunked": xla_chunked}
