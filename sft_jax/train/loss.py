"""Next-token cross-entropy computed in token chunks.

The unembedding and softmax run over `chunk` positions at a time inside a
`lax.scan`, so no pass ever holds more than [B, chunk, V] float32 logits:
with a 128k vocabulary and 16k tokens per device the full logits would take
8 GB, and their gradient as much again.

Two forms:
  token_losses  per-token values; the backward pass recomputes each chunk's
                logits (evaluation, reference).
  weighted_ce   the training loss sum(w_nll * nll + w_z * log_z^2) with its
                gradients computed in the forward pass, chunk by chunk (a
                custom VJP). The loss is linear in the per-token terms, so the
                weights (mask / global token count) are known up front and
                the backward pass only scales: three [chunk, D, V] matmuls
                per chunk instead of four.

Shapes: B = rows, T = positions, D = model width, V = vocabulary,
C = positions per chunk, K = chunks, S = data sources.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from sft_jax.models.sharding import constrain
from sft_jax.models.sharding import constrain_weight

# Chunk layouts: rows stay data-parallel, logits split over the vocabulary.
_BCD = ("batch", "length", "act_embed")
_BCV = ("batch", "length", "act_vocab")
_DV = ("embed", "vocab")  # The unembedding, gathered over the batch axes.


def token_losses(hidden_BxTxD: jax.Array, w_DxV: jax.Array,
                 targets_BxT: jax.Array,
                 logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 chunk: int) -> dict[str, jax.Array]:
  """Per-token -log p(target), log Z and argmax == target, in chunks.

  Chunks run along the sequence (all rows at once), so the batch axis keeps
  its data-parallel sharding and no chunk needs another device's rows.

  Args:
    hidden_BxTxD: final hidden states (after the final norm), compute dtype.
    w_DxV: unembedding matrix.
    targets_BxT: int32 target ids.
    logits_fn: (hidden_BxCxD, w_DxV) -> logits_BxCxV (soft-capping etc.).
    chunk: positions per chunk C; T is padded up to a multiple of it.

  Returns:
    {"nll": [B, T], "log_z": [B, T], "correct": [B, T]}, float32.
  """
  b, t, d = hidden_BxTxD.shape
  chunk = max(1, min(chunk, t))
  num_chunks = -(-t // chunk)
  pad = num_chunks * chunk - t
  hidden_KxBxCxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(
      b, num_chunks, chunk, d).swapaxes(0, 1)
  targets_KxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(
      b, num_chunks, chunk).swapaxes(0, 1)

  # Rematerialised: the backward pass recomputes one chunk's logits at a
  # time instead of saving them all.
  @jax.checkpoint
  def one_chunk(h_BxCxD, t_BxC):
    h_BxCxD = constrain(h_BxCxD, _BCD)
    logits_BxCxV = constrain(logits_fn(
        h_BxCxD, constrain_weight(w_DxV, _DV)).astype(jnp.float32), _BCV)
    log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(
        logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    correct_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == t_BxC)
    return (log_z_BxC - target_logit_BxC, log_z_BxC,
            jax.lax.stop_gradient(correct_BxC.astype(jnp.float32)))

  def body(carry, xs):
    return carry, one_chunk(*xs)

  _, outs = jax.lax.scan(body, None, (hidden_KxBxCxD, targets_KxBxC))
  unchunk = lambda x_KxBxC: x_KxBxC.swapaxes(0, 1).reshape(b, -1)[:, :t]
  nll, log_z, correct = map(unchunk, outs)
  return {"nll": nll, "log_z": log_z, "correct": correct}


def _chunked(x_BxT_, chunk):
  """[B, T, ...] -> [K, B, C, ...], T zero-padded to K * C."""
  b, t = x_BxT_.shape[:2]
  k = -(-t // chunk)
  pad = [(0, 0), (0, k * chunk - t)] + [(0, 0)] * (x_BxT_.ndim - 2)
  x = jnp.pad(x_BxT_, pad)
  return x.reshape((b, k, chunk) + x.shape[2:]).swapaxes(0, 1)


def _unchunked(x_KxBxC_, t):
  """[K, B, C, ...] -> [B, T, ...] (drops the padding)."""
  x = x_KxBxC_.swapaxes(0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :t]


def _max_and_correct(logits_BxCxV, t_BxC, target_logit_BxC):
  """(max over V, 1.0 where argmax == target else 0.0), in one pass.

  argmax (the first id holding the max) is the target iff the target holds
  the max and no earlier id does. The pass is a max over blocks of ids;
  "no earlier id" then reads only the block maxima and the target's block.
  That is much cheaper on CPU than argmax's variadic reduce, or than a
  second full pass (an int min, or a count of earlier maxima).
  """
  b, c, v = logits_BxCxV.shape
  block = math.gcd(v, 128)
  if block < 16:  # no usable block size: count earlier maxima instead
    max_BxC = jnp.max(logits_BxCxV, axis=-1)
    v_BxCxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2)
    earlier_BxC = jnp.any((logits_BxCxV == max_BxC[..., None])
                          & (v_BxCxV < t_BxC[..., None]), axis=-1)
  else:
    logits_BxCxNxL = logits_BxCxV.reshape(b, c, v // block, block)
    block_max_BxCxN = jnp.max(logits_BxCxNxL, axis=-1)
    max_BxC = jnp.max(block_max_BxCxN, axis=-1)
    t_block_BxC, t_offset_BxC = t_BxC // block, t_BxC % block
    n_BxCxN = jax.lax.broadcasted_iota(jnp.int32, block_max_BxCxN.shape, 2)
    earlier_block_BxC = jnp.any(
        (block_max_BxCxN == max_BxC[..., None])
        & (n_BxCxN < t_block_BxC[..., None]), axis=-1)
    t_ids_BxCxL = jnp.take_along_axis(
        logits_BxCxNxL, t_block_BxC[..., None, None], axis=2)[..., 0, :]
    l_BxCxL = jax.lax.broadcasted_iota(jnp.int32, t_ids_BxCxL.shape, 2)
    earlier_BxC = earlier_block_BxC | jnp.any(
        (t_ids_BxCxL == max_BxC[..., None])
        & (l_BxCxL < t_offset_BxC[..., None]), axis=-1)
  correct_BxC = (jnp.isfinite(max_BxC) & (target_logit_BxC == max_BxC)
                 & ~earlier_BxC)
  return max_BxC, correct_BxC.astype(jnp.float32)


def _weighted_ce_scan(hidden_BxTxD, w_DxV, targets_BxT, nll_weight_BxT,
                      z_weight_BxT, logits_fn, chunk, with_grads):
  b, t, _ = hidden_BxTxD.shape
  chunk = max(1, min(chunk, t))
  xs = tuple(_chunked(x, chunk) for x in (hidden_BxTxD, targets_BxT,
                                          nll_weight_BxT, z_weight_BxT))

  def body(dw_DxV, x):
    h_BxCxD, t_BxC, nw_BxC, zw_BxC = x
    h_BxCxD = constrain(h_BxCxD, _BCD)
    f = lambda h, w: constrain(logits_fn(
        h, constrain_weight(w, _DV)).astype(jnp.float32), _BCV)
    if with_grads:
      logits_BxCxV, vjp = jax.vjp(f, h_BxCxD, w_DxV)
    else:
      logits_BxCxV = f(h_BxCxD, w_DxV)
    # Few passes over the [B, C, V] logits, none materialising a one-hot
    # (on CPU each pass costs about as much as a quarter of the matmul):
    # the max (with what argmax == target needs), then sum(exp), the target
    # logit by a gather.
    v_BxCxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2)
    target_logit_BxC = jnp.take_along_axis(
        logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    max_BxC, correct_BxC = _max_and_correct(jax.lax.stop_gradient(
        logits_BxCxV), t_BxC, jax.lax.stop_gradient(target_logit_BxC))
    max_BxC = jnp.where(jnp.isfinite(max_BxC), max_BxC, 0.0)
    exp_BxCxV = jnp.exp(logits_BxCxV - max_BxC[..., None])
    sum_BxC = jnp.sum(exp_BxCxV, axis=-1)
    log_z_BxC = jnp.log(sum_BxC) + max_BxC
    nll_BxC = log_z_BxC - target_logit_BxC
    loss = jnp.sum(nll_BxC * nw_BxC + jnp.square(log_z_BxC) * zw_BxC)
    out = (loss, nll_BxC, log_z_BxC, correct_BxC)
    if not with_grads:
      return dw_DxV, out
    # d loss / d logits = (w_nll + 2 w_z log Z) softmax - w_nll onehot.
    coef_BxC = (nw_BxC + 2 * zw_BxC * log_z_BxC) / sum_BxC
    dlogits_BxCxV = (coef_BxC[..., None] * exp_BxCxV - jnp.where(
        v_BxCxV == t_BxC[..., None], nw_BxC[..., None], 0.0))
    dh_BxCxD, dw = vjp(dlogits_BxCxV)
    return dw_DxV + dw.astype(jnp.float32), out + (dh_BxCxD,)

  dw_DxV = jnp.zeros(w_DxV.shape, jnp.float32)
  dw_DxV, outs = jax.lax.scan(body, dw_DxV, xs)
  loss = jnp.sum(outs[0])
  per_token = {"nll": _unchunked(outs[1], t), "log_z": _unchunked(outs[2], t),
               "correct": _unchunked(outs[3], t)}
  if not with_grads:
    return (loss, per_token), None
  dh_BxTxD = _unchunked(outs[4], t).astype(hidden_BxTxD.dtype)
  return (loss, per_token), (dh_BxTxD, dw_DxV.astype(w_DxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def weighted_ce(hidden_BxTxD, w_DxV, targets_BxT, nll_weight_BxT,
                z_weight_BxT, logits_fn, chunk):
  """Weighted CE sum and per-token values, gradients fused into the forward.

  Args:
    hidden_BxTxD: final hidden states, compute dtype.
    w_DxV: unembedding matrix.
    targets_BxT: int32 target ids.
    nll_weight_BxT: float32 weight of each token's -log p(target) (e.g.
      loss_mask / number of supervised tokens in the global batch).
    z_weight_BxT: float32 weight of each token's log(Z)^2 (z-loss).
    logits_fn: (hidden_BxCxD, w_DxV) -> logits_BxCxV.
    chunk: positions per chunk.

  Returns:
    (loss, {"nll", "log_z", "correct": [B, T] float32}); only `loss` carries
    gradients (to hidden and w), the per-token values are for metrics.
  """
  return _weighted_ce_scan(hidden_BxTxD, w_DxV, targets_BxT, nll_weight_BxT,
                           z_weight_BxT, logits_fn, chunk, False)[0]


def _weighted_ce_fwd(hidden_BxTxD, w_DxV, targets_BxT, nll_weight_BxT,
                     z_weight_BxT, logits_fn, chunk):
  return _weighted_ce_scan(hidden_BxTxD, w_DxV, targets_BxT, nll_weight_BxT,
                           z_weight_BxT, logits_fn, chunk, True)


def _weighted_ce_bwd(logits_fn, chunk, grads, cotangents):
  del logits_fn, chunk
  g_loss = cotangents[0]  # Per-token outputs are metrics: no gradient.
  dh_BxTxD, dw_DxV = grads
  return ((g_loss * dh_BxTxD).astype(dh_BxTxD.dtype),
          (g_loss * dw_DxV).astype(dw_DxV.dtype), None, None, None)


weighted_ce.defvjp(_weighted_ce_fwd, _weighted_ce_bwd)


def naive_token_losses(hidden_BxTxD, w_DxV, targets_BxT, logits_fn):
  """Reference: the same quantities from the full [B, T, V] logits."""
  logits = logits_fn(hidden_BxTxD, w_DxV).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets_BxT).astype(jnp.float32)
  return {"nll": log_z - target, "log_z": log_z, "correct": correct}


def masked_sums(losses: dict[str, jax.Array], loss_mask_BxT: jax.Array,
                source_id_BxT: jax.Array, num_sources: int,
                z_loss: float) -> dict[str, jax.Array]:
  """Sums over supervised tokens, total and per source (un-normalised).

  Returns float32 scalars "nll_sum", "z_sum" (z_loss * log Z^2), "correct_sum",
  "count", and [S] arrays "source_nll_sum", "source_correct_sum",
  "source_count".
  """
  m = loss_mask_BxT.astype(jnp.float32)
  sums = {
      "nll_sum": jnp.sum(losses["nll"] * m),
      "z_sum": z_loss * jnp.sum(jnp.square(losses["log_z"]) * m),
      "correct_sum": jnp.sum(losses["correct"] * m),
      "count": jnp.sum(m),
  }
  # One-hot over a handful of sources: a tiny matmul that keeps the batch
  # axis sharded (a scatter-add would gather it).
  onehot_BxTxS = jax.nn.one_hot(source_id_BxT, num_sources, dtype=jnp.float32)
  seg = lambda x: jnp.einsum("bt,bts->s", x * m, onehot_BxTxS)
  sums["source_nll_sum"] = seg(losses["nll"])
  sums["source_correct_sum"] = seg(losses["correct"])
  sums["source_count"] = seg(jnp.ones_like(m))
  return sums
