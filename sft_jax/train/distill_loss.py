"""Distillation objective: cross-entropy plus a divergence to a teacher.

Per supervised token,

  loss = alpha * CE(target) + (1 - alpha) * tau^2 * D(teacher_tau, student_tau)

where p_tau = softmax(logits / tau) and D is one of

  forward_kl  KL(teacher || student) = sum p_T (log p_T - log p_S)  (default)
  reverse_kl  KL(student || teacher) = sum p_S (log p_S - log p_T)
  jsd         0.5 KL(p_T || M) + 0.5 KL(p_S || M), M = (p_T + p_S) / 2

Like the CE, the per-token terms are weighted by loss_mask / (supervised
tokens of the GLOBAL batch), so gradient accumulation and the mesh shape do
not change the loss.

Top-k (top_k = K > 0, and always for an offline teacher): the support is the
teacher's K most likely tokens, and BOTH distributions are renormalised over
it: p_T = softmax(teacher logits[topk] / tau), p_S = softmax(student
logits[topk] / tau). The tail mass is dropped, not kept as a bucket, because
an offline cache of top-k log-probs at tau = 1 gives the teacher's top-k
distribution exactly at any tau by renormalising (log p / tau differs from
logits / tau by a constant), while the tail mass at tau != 1 is not
recoverable from it. This is MaxText's and Tunix's convention (EasyDeL keeps
the student unnormalised).

Everything runs in position chunks inside a `lax.scan` with the chunk body
rematerialised, so at most [B, C, V] float32 logits of the student and of the
teacher exist at a time, never [B, T, V] of either.

Shapes: B rows, T positions, D student width, E teacher width, V vocabulary,
K teacher top-k, C positions per chunk.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sft_jax.train import loss as loss_lib

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# The CE's [B, T, ...] <-> [K, B, C, ...] position chunking, shared.
_chunked = loss_lib._chunked  # pylint: disable=protected-access
_unchunked = loss_lib._unchunked  # pylint: disable=protected-access


def divergence(student_logp_BxCxN: jax.Array, teacher_logp_BxCxN: jax.Array,
               kind: str) -> jax.Array:
  """Per-position divergence [B, C] of two log-distributions over N values."""
  ls, lt = student_logp_BxCxN, teacher_logp_BxCxN
  ps, pt = jnp.exp(ls), jnp.exp(lt)
  if kind == "forward_kl":
    return jnp.sum(pt * (lt - ls), axis=-1)
  if kind == "reverse_kl":
    return jnp.sum(ps * (ls - lt), axis=-1)
  if kind == "jsd":
    lm = jnp.logaddexp(ls, lt) - jnp.log(2.0)
    return 0.5 * jnp.sum(pt * (lt - lm), axis=-1) + 0.5 * jnp.sum(
        ps * (ls - lm), axis=-1)
  raise ValueError(f"config distill.divergence: unknown {kind!r} "
                   f"({' | '.join(DIVERGENCES)})")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The static settings of the distillation term."""
  alpha: float  # weight of the CE; (1 - alpha) weighs tau^2 * divergence
  temperature: float  # tau
  top_k: int  # 0 = full vocabulary (online teacher only)
  divergence: str  # one of DIVERGENCES


def _student_teacher_logp(objective, s_logits_BxCxV, teacher):
  """(student, teacher) log-probs at tau over the distillation support."""
  tau = objective.temperature
  s_BxCxV = s_logits_BxCxV / tau
  if "ids" in teacher:  # offline: top-k ids and their log-probs at tau = 1
    ids_BxCxK = teacher["ids"]
    t_BxCxK = teacher["logp"].astype(jnp.float32) / tau
    s_BxCxK = jnp.take_along_axis(s_BxCxV, ids_BxCxK, axis=-1)
    return (jax.nn.log_softmax(s_BxCxK, axis=-1),
            jax.nn.log_softmax(t_BxCxK, axis=-1))
  t_BxCxV = jax.lax.stop_gradient(teacher["logits"]) / tau
  if objective.top_k:
    t_BxCxK, ids_BxCxK = jax.lax.top_k(t_BxCxV, objective.top_k)
    s_BxCxK = jnp.take_along_axis(s_BxCxV, ids_BxCxK, axis=-1)
    return (jax.nn.log_softmax(s_BxCxK, axis=-1),
            jax.nn.log_softmax(t_BxCxK, axis=-1))
  return (jax.nn.log_softmax(s_BxCxV, axis=-1),
          jax.nn.log_softmax(t_BxCxV, axis=-1))


def weighted_distill(objective: Objective, hidden_BxTxD: jax.Array,
                     w_DxV: jax.Array, targets_BxT: jax.Array,
                     weight_BxT: jax.Array, z_weight_BxT: jax.Array,
                     logits_fn: Callable, chunk: int, teacher: dict
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted distillation loss of a micro-batch, and per-token values.

  Args:
    objective: alpha, temperature, top_k, divergence.
    hidden_BxTxD, w_DxV, logits_fn: the student's final hidden states,
      unembedding and (hidden, w) -> logits function.
    targets_BxT: int32 target ids.
    weight_BxT: float32 per-token weight (loss_mask / global token count).
    z_weight_BxT: float32 weight of log(Z)^2 (z-loss).
    chunk: positions per chunk.
    teacher: online {"hidden": [B, T, E], "w": [E, V], "logits_fn"}, or
      offline {"ids": int32 [B, T, K], "logp": [B, T, K]} (log-probs at
      tau = 1 of the teacher's top-k tokens).

  Returns:
    (loss, {"nll", "log_z", "correct", "div": [B, T] float32}) where
    loss = sum(weight * (alpha nll + (1 - alpha) tau^2 div) + z_weight *
    log_z^2); only `loss` carries gradients (to hidden and w).
  """
  t = hidden_BxTxD.shape[1]
  chunk = max(1, min(chunk, t))
  online = "hidden" in teacher
  t_xs = ((teacher["hidden"],) if online else (teacher["ids"],
                                               teacher["logp"]))
  xs = tuple(_chunked(x, chunk) for x in (
      hidden_BxTxD, targets_BxT, weight_BxT, z_weight_BxT) + t_xs)
  kl_scale = (1.0 - objective.alpha) * objective.temperature ** 2

  # Rematerialised: the backward pass recomputes one chunk's logits (student
  # and teacher) instead of keeping every chunk's.
  @jax.checkpoint
  def one_chunk(w, h_BxCxD, t_BxC, w_BxC, zw_BxC, *tx):
    s_logits_BxCxV = logits_fn(h_BxCxD, w).astype(jnp.float32)
    if online:
      tch = {"logits": teacher["logits_fn"](tx[0], teacher["w"]).astype(
          jnp.float32)}
    else:
      tch = {"ids": tx[0], "logp": tx[1]}
    log_z_BxC = jax.nn.logsumexp(s_logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(s_logits_BxCxV, t_BxC[..., None],
                                     axis=-1)[..., 0]
    nll_BxC = log_z_BxC - target_BxC
    ls, lt = _student_teacher_logp(objective, s_logits_BxCxV, tch)
    div_BxC = divergence(ls, lt, objective.divergence)
    loss = jnp.sum(w_BxC * (objective.alpha * nll_BxC + kl_scale * div_BxC)
                   + zw_BxC * jnp.square(log_z_BxC))
    correct_BxC = (jnp.argmax(s_logits_BxCxV, axis=-1) == t_BxC).astype(
        jnp.float32)
    per_token = jax.lax.stop_gradient((nll_BxC, log_z_BxC, correct_BxC,
                                       div_BxC))
    return loss, per_token

  def body(total, x):
    loss, per_token = one_chunk(w_DxV, *x)
    return total + loss, per_token

  total, outs = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  per_token = {k: _unchunked(v, t) for k, v in zip(
      ("nll", "log_z", "correct", "div"), outs)}
  return total, per_token


def teacher_topk_logp(hidden_BxTxE: jax.Array, w_ExV: jax.Array,
                      logits_fn: Callable, k: int, chunk: int
                      ) -> tuple[jax.Array, jax.Array]:
  """The teacher's top-k (ids int32, log-probs float32) [B, T, K], chunked.

  Log-probs are at temperature 1 over the full vocabulary; this is what the
  offline cache stores.
  """
  t = hidden_BxTxE.shape[1]
  chunk = max(1, min(chunk, t))

  def body(carry, h_BxCxE):
    logits_BxCxV = logits_fn(h_BxCxE, w_ExV).astype(jnp.float32)
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    vals, ids = jax.lax.top_k(logp_BxCxV, k)
    return carry, (ids.astype(jnp.int32), vals)

  _, (ids, vals) = jax.lax.scan(body, None, _chunked(hidden_BxTxE, chunk))
  return _unchunked(ids, t), _unchunked(vals, t)
