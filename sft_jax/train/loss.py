"""Next-token cross-entropy computed in token chunks.

The unembedding and softmax run over `chunk` tokens at a time inside a
`lax.scan` whose body is rematerialised, so neither the forward nor the
backward pass ever holds more than [chunk, V] float32 logits: with a 128k
vocabulary and 16k tokens per device the full logits would take 8 GB, and
their gradient as much again.

Shapes: B = rows, T = positions, D = model width, V = vocabulary,
C = positions per chunk, K = chunks, S = data sources.
"""

from typing import Callable

import jax
import jax.numpy as jnp


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
    logits_BxCxV = logits_fn(h_BxCxD, w_DxV).astype(jnp.float32)
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
