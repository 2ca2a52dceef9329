"""Batched KV-cache decoding.

Prompts of different lengths share one batch without left padding: each row
is written to the cache from slot 0, padding slots carry segment id 0 (never
attended), and every row continues at its own position. Because the model
masks by segment and position (not by slot), row b's tokens see exactly what
they would see if row b ran alone.

Shapes are bucketed (batch and prompt length rounded up to a power of two)
so that a new prompt compiles nothing as long as it falls in a bucket that
has been seen; `max_new_tokens` and the sampling settings are static too.

Dimension letters: B batch, P prompt length (bucketed), N new tokens,
V vocabulary, S stop ids.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import models
from sft_jax.infer import sampling as sampling_lib

# Smallest prompt-length bucket: prompts shorter than this share one shape.
_MIN_LENGTH_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(n, minimum, 1)
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class Completion:
  """One row's output.

  Attributes:
    tokens: the generated ids, including the stop id when one ended the row.
    stopped: True when a stop id ended the row (False: max_new_tokens hit).
  """
  tokens: list[int]
  stopped: bool

  @property
  def content_tokens(self) -> list[int]:
    """The generated ids without the final stop id."""
    return self.tokens[:-1] if self.stopped else self.tokens


# Counts traces of `_decode`; tests read it to prove bucketing avoids
# recompilation.
trace_count = 0


@functools.partial(
    jax.jit, static_argnames=("model_cfg", "max_new_tokens", "sampling"))
def _decode(variables, tokens_BxP, lengths_B, stop_ids_S, rng, *,
            model_cfg, max_new_tokens: int, sampling: sampling_lib.Sampling):
  """Prefills the cache with the prompts, then decodes up to N tokens.

  Args:
    variables: {"params": ..., optionally "lora": ...}.
    tokens_BxP: int32 prompts, right-padded (any id) beyond `lengths_B`.
    lengths_B: int32 prompt lengths; 0 marks a padding row (its output is
      ignored; it is fed one dummy token so its attention is never empty).
    stop_ids_S: int32 ids that end a row; -1 entries never match.
    rng: a PRNG key (unused for greedy decoding).

  Returns:
    out_BxN int32 generated ids (-1 after a row stopped) and done_B bool.
  """
  global trace_count
  trace_count += 1
  model = models.Transformer(model_cfg)
  b, p = tokens_BxP.shape
  n = max_new_tokens
  real_B = lengths_B > 0
  lengths_B = jnp.maximum(lengths_B, 1)
  slots_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments_BxP = (slots_BxP < lengths_B[:, None]).astype(jnp.int32)
  cache = models.init_cache(model_cfg, b, p + n, jnp.dtype(model_cfg.dtype))

  # Only each row's last prompt position needs logits: [B, P, V] would be
  # the largest array of the whole generation.
  hidden_BxPxD, cache = model.apply(
      variables, tokens_BxP, slots_BxP, segments_BxP, cache=cache,
      cache_index=0, return_hidden=True)
  last_Bx1xD = jnp.take_along_axis(
      hidden_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
  last_BxV = models.logits_from_hidden(
      last_Bx1xD, models.unembedding(variables["params"], model_cfg),
      model_cfg)[:, 0]

  def is_stop(tok_B):
    return jnp.any(tok_B[:, None] == stop_ids_S[None, :], axis=-1)

  tok_B = sampling_lib.sample(last_BxV, jax.random.fold_in(rng, 0), sampling)
  out_BxN = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(tok_B)
  done_B = is_stop(tok_B) | ~real_B

  def cond(state):
    t, _, _, _, done_B = state
    return (t < n - 1) & ~jnp.all(done_B)

  def body(state):
    t, cache, tok_B, out_BxN, done_B = state
    # Token t sits at position length + t and cache slot p + t.
    pos_Bx1 = (lengths_B + t)[:, None]
    logits_Bx1xV, cache = model.apply(
        variables, tok_B[:, None], pos_Bx1, jnp.ones_like(pos_Bx1),
        cache=cache, cache_index=p + t)
    new_B = sampling_lib.sample(
        logits_Bx1xV[:, 0], jax.random.fold_in(rng, t + 1), sampling)
    new_B = jnp.where(done_B, -1, new_B)
    out_BxN = out_BxN.at[:, t + 1].set(new_B)
    done_B = done_B | is_stop(new_B)
    # A stopped row keeps feeding its last real token; its output is masked.
    tok_B = jnp.where(done_B, tok_B, new_B)
    return t + 1, cache, tok_B, out_BxN, done_B

  state = (jnp.int32(0), cache, tok_B, out_BxN, done_B)
  _, _, _, out_BxN, done_B = jax.lax.while_loop(cond, body, state)
  return out_BxN, done_B & real_B


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host, also when it spans several processes
  (multi-host evaluation inside training: every process decodes the same
  prompts)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(model_cfg, variables, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, stop_ids: Sequence[int] = (),
             sampling: sampling_lib.Sampling = sampling_lib.GREEDY,
             seed: int = 0, batch_size: int = 8,
             min_length_bucket: int = _MIN_LENGTH_BUCKET) -> list[Completion]:
  """Generates a continuation of every prompt.

  Args:
    model_cfg: the models.ModelConfig (hashable; static under jit).
    variables: {"params": ..., optionally "lora": ...}.
    prompts: token id lists (already templated and tokenized), any lengths.
    max_new_tokens: the most tokens generated per prompt.
    stop_ids: ids that end a row (EOS, end-of-turn); the stop id is kept in
      the returned tokens.
    sampling: greedy by default.
    seed: sampling seed; the same seed, prompts and batch give the same text.
    batch_size: the most prompts decoded together; batches are padded to a
      power of two no larger than this.
    min_length_bucket: the smallest prompt-length bucket.

  Returns:
    One Completion per prompt, in order.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {i} is empty: nothing to condition on")
  stops = sorted(set(int(s) for s in stop_ids))
  stop_ids_S = np.full((bucket(len(stops)),), -1, np.int32)
  stop_ids_S[:len(stops)] = stops
  rng = jax.random.key(seed)
  results = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    b = min(bucket(len(chunk)), bucket(batch_size))
    p = bucket(max(len(x) for x in chunk), min_length_bucket)
    tokens_BxP = np.zeros((b, p), np.int32)
    lengths_B = np.zeros((b,), np.int32)
    for i, prompt in enumerate(chunk):
      tokens_BxP[i, :len(prompt)] = prompt
      lengths_B[i] = len(prompt)
    out_BxN, done_B = _decode(
        variables, tokens_BxP, lengths_B, stop_ids_S,
        jax.random.fold_in(rng, start), model_cfg=model_cfg,
        max_new_tokens=max_new_tokens, sampling=sampling)
    out_BxN, done_B = _to_host(out_BxN), _to_host(done_B)
    for i in range(len(chunk)):
      row = out_BxN[i]
      row = row[row >= 0].tolist()
      results.append(Completion(tokens=row, stopped=bool(done_B[i])))
  return results
