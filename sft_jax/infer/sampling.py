"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions on `logits_BxV`, jit-friendly. The settings are a frozen
dataclass so the decode loop can take them as a static argument: a new
setting compiles once, the same setting never again.

The filters follow the order and the tie rules of `transformers`' logits
warpers (temperature, then top-k, then top-p), so `sft-jax generate` with a
given setting samples from the same distribution as `model.generate`.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick a token.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (ties at the k-th value kept too);
      0 disables.
    top_p: keep the smallest set of most likely tokens whose probability mass
      reaches top_p (at least one token); 1.0 disables.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling()


def top_k_mask(logits_BxV: jax.Array, k: int) -> jax.Array:
  """Logits with everything below the k-th largest value set to -inf."""
  k = min(k, logits_BxV.shape[-1])
  kth_B1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
  return jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)


def top_p_mask(logits_BxV: jax.Array, p: float) -> jax.Array:
  """Logits outside the top-p nucleus set to -inf.

  A token is dropped when the probability mass of the tokens less likely
  than it (itself included) is at most 1 - p, the rule `transformers` uses;
  the most likely token is always kept.
  """
  order_BxV = jnp.argsort(logits_BxV, axis=-1)  # ascending
  sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
  cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  drop_sorted_BxV = cum_BxV <= 1.0 - p
  drop_sorted_BxV = drop_sorted_BxV.at[:, -1].set(False)
  # Scatter the sorted decision back to vocabulary order.
  rows_B1 = jnp.arange(logits_BxV.shape[0])[:, None]
  drop_BxV = jnp.zeros_like(drop_sorted_BxV).at[rows_B1, order_BxV].set(
      drop_sorted_BxV)
  return jnp.where(drop_BxV, -jnp.inf, logits_BxV)


def filtered_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
  """Float32 logits after temperature, top-k and top-p (not for greedy)."""
  logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    logits_BxV = top_k_mask(logits_BxV, sampling.top_k)
  if sampling.top_p < 1.0:
    logits_BxV = top_p_mask(logits_BxV, sampling.top_p)
  return logits_BxV


def sample(logits_BxV: jax.Array, rng: jax.Array,
           sampling: Sampling) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V]."""
  if sampling.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filtered_logits(logits_BxV, sampling)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
