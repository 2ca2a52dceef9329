"""`xla_chunked`: the reference over query blocks, skipping invisible keys.

Query block i (rows [i*C, (i+1)*C), C = T/4 clamped to [128, 512]) attends
only to the key range that can be visible to it, which in train mode (index
causality) is static:

  keys [max(0, i*C - window + 1), (i+1)*C)   (window = 0: from key 0)

so a causal layer computes about half of T x S and a sliding-window layer
about (C + window) x T (Gemma-3's 512 window at 4096 tokens, C = 512: 42%
of the causal work, 12% of dense). The layer has one flash-attention style
custom VJP: only q, k, v, the output and each block's softmax row max and
sum are saved; the backward pass rebuilds each block's mask and logits, so
peak memory is one [B, N, G * C, S_i] block.

Any T works: queries (and, in train mode, keys) are padded to a multiple of C
with segment 0, which no real query sees, and the padded rows are dropped.
In cache mode positions decide causality, nothing static is known, and every
block sees all S keys. A traced window cannot skip either.
"""

import functools
from typing import Any, NamedTuple

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


def _block_grads(q, k, v, mask_BxCxS, out, max_BxNxM, sum_BxNxM,
                 dout_BxNxMxK, softcap, scale):
  """(dq, dk, dv) of one block: the flash-attention backward.

  It recomputes the logits from q and k, rebuilds the probabilities in one
  elementwise pass from the saved row max and sum, and never differentiates
  through max/sum/divide. (Not log-sum-exp: a row with no visible key has
  max -0.7 * float32 max, which absorbs log(S).)
  """
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
  return dq, jnp.swapaxes(dk_BxNxKxS, 2, 3), jnp.swapaxes(dv_BxNxKxS, 2, 3)


class _Plan(NamedTuple):
  """What `_attend` needs to know statically."""
  blocks: int
  chunk: int
  window: Any  # static int, None, or "traced" (passed as an operand)
  softcap: Any
  scale: float
  train: bool  # keys are the queries' tokens (static key ranges)


def _keys(plan: _Plan, block: int, s: int) -> tuple[int, int]:
  if not plan.train:
    return 0, s
  window = plan.window if isinstance(plan.window, int) else None
  return key_range(block, plan.chunk, window, s)


def _masks(plan, q_ord, q_seg, kv_ord, kv_seg, window):
  """Per block: ((lo, hi), its [B, C, hi - lo] mask)."""
  window = window if plan.window == "traced" else plan.window
  out = []
  for i in range(plan.blocks):
    rows = slice(i * plan.chunk, (i + 1) * plan.chunk)
    lo, hi = _keys(plan, i, kv_ord.shape[1])
    out.append(((lo, hi), attention_lib.attention_mask(
        q_ord[:, rows], q_seg[:, rows], kv_ord[:, lo:hi], kv_seg[:, lo:hi],
        window)))
  return out


def _as_blocks(plan, x_BxNxGxTxK):
  """[B, N, G, T, K] -> per block [B, N, M, K] (M = G * C)."""
  b, n, g, _, d = x_BxNxGxTxK.shape
  return [x.reshape(b, n, g * plan.chunk, d)
          for x in jnp.split(x_BxNxGxTxK, plan.blocks, axis=3)]


def _attend_fwd(plan, q_BxNxGxTxK, k_BxNxSxK, v_BxNxSxK, q_ord, q_seg,
                kv_ord, kv_seg, window):
  b, n, g, _, d = q_BxNxGxTxK.shape
  outs, stats = [], []
  for q, ((lo, hi), mask) in zip(
      _as_blocks(plan, q_BxNxGxTxK),
      _masks(plan, q_ord, q_seg, kv_ord, kv_seg, window)):
    out, row_stats = _block_fwd(q, k_BxNxSxK[:, :, lo:hi],
                                v_BxNxSxK[:, :, lo:hi], mask, plan.softcap,
                                plan.scale)
    outs.append(out.reshape(b, n, g, plan.chunk, d))
    stats.append(row_stats)
  out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  # Saved: the operands, the output and two [B, N, M] rows per block; each
  # block's keys and mask are sliced or rebuilt again in the backward pass.
  return out, (q_BxNxGxTxK, k_BxNxSxK, v_BxNxSxK, q_ord, q_seg, kv_ord,
               kv_seg, window, out, stats)


def _attend_bwd(plan, residuals, dout_BxNxGxTxK):
  q_all, k_all, v_all, q_ord, q_seg, kv_ord, kv_seg, window, out, stats = (
      residuals)
  b, n, g, _, d = q_all.shape
  s = k_all.shape[2]
  # Key gradients are summed per key block of `chunk` (train mode: S is a
  # multiple of it), then joined: no full-length zero-padded copy per block.
  width = plan.chunk if plan.train else s
  dk_parts, dv_parts = [None] * (s // width), [None] * (s // width)
  dqs = []
  for q, o, do, (max_, sum_), ((lo, hi), mask) in zip(
      _as_blocks(plan, q_all), _as_blocks(plan, out),
      _as_blocks(plan, dout_BxNxGxTxK), stats,
      _masks(plan, q_ord, q_seg, kv_ord, kv_seg, window)):
    dq, dk, dv = _block_grads(q, k_all[:, :, lo:hi], v_all[:, :, lo:hi],
                              mask, o, max_, sum_, do, plan.softcap,
                              plan.scale)
    dqs.append(dq.reshape(b, n, g, plan.chunk, d))
    for j in range(lo // width, -(-hi // width)):
      a, z = max(lo, j * width), min(hi, (j + 1) * width)
      pad = ((0, 0), (0, 0), (a - j * width, (j + 1) * width - z), (0, 0))
      for parts, grad in ((dk_parts, dk), (dv_parts, dv)):
        piece = jnp.pad(grad[:, :, a - lo:z - lo], pad)
        parts[j] = piece if parts[j] is None else parts[j] + piece
  zeros = jnp.zeros((b, n, width, d), jnp.float32)
  join = lambda parts: jnp.concatenate(
      [zeros if p is None else p for p in parts], axis=2)
  dq = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
  return (dq.astype(q_all.dtype), join(dk_parts).astype(k_all.dtype),
          join(dv_parts).astype(v_all.dtype), None, None, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q_BxNxGxTxK, k_BxNxSxK, v_BxNxSxK, q_ord, q_seg, kv_ord,
            kv_seg, window):
  """All query blocks, one custom VJP: [B, N, G, T, K] out.

  One VJP for the whole layer (not one per block) saves q, k, v and the
  output once; per-block VJPs saved each block's slice of the keys (a
  causal layer: about half of T blocks' worth of copies) and its mask.
  """
  return _attend_fwd(plan, q_BxNxGxTxK, k_BxNxSxK, v_BxNxSxK, q_ord, q_seg,
                     kv_ord, kv_seg, window)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


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
  n = k_BxSxNxK.shape[2]
  g = h // n
  q_BxNxGxTxK = q_BxTxHxK.reshape(b, tp, n, g, d).transpose(0, 2, 3, 1, 4)
  k_BxNxSxK, v_BxNxSxK = (x.transpose(0, 2, 1, 3) for x in (k_BxSxNxK,
                                                           v_BxSxNxK))
  static_window = window is None or isinstance(window, int)
  plan = _Plan(blocks=blocks, chunk=chunk,
               window=window if static_window else "traced",
               softcap=softcap, scale=scale, train=mode == "train")
  out_BxNxGxTxK = _attend(plan, q_BxNxGxTxK, k_BxNxSxK, v_BxNxSxK, q_ord,
                          q_seg_BxT, kv_ord, kv_seg_BxS,
                          None if static_window else window)
  return out_BxNxGxTxK.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


IMPLEMENTATIONS = {"xla_chunked": xla_chunked}
