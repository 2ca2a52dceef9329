"""Optimizer, learning-rate schedule, clipping and weight-decay mask.

The optimizer is built over the trainable tree only (see step.py), so frozen
parameters never get optimizer state.
"""

import re

import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from sft_jax.train import partition


def schedule(optim_cfg: config_dict.ConfigDict, total_steps: int, *,
             start: int = 0) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine / linear decay or constant.

  The schedule runs from optimizer step `start` (before it: its first value)
  to `total_steps`; a resume that restarts the decay sets `start`.
  """
  if start:
    inner = schedule(optim_cfg, total_steps - start)
    return lambda count: inner(jnp.maximum(count - start, 0))
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  end = lr * optim_cfg.end_lr_ratio
  decay_steps = max(1, total_steps - warmup)
  if optim_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps,
                                        alpha=optim_cfg.end_lr_ratio)
  elif optim_cfg.schedule == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  elif optim_cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule: unknown {optim_cfg.schedule!r} "
                     "(cosine | linear | constant)")
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(tree: partition.Tree, exclude: str) -> partition.Tree:
  """True for leaves that decay: those whose path does not match `exclude`.

  By path, not by rank: with layers stacked, a norm scale is [L, D].
  """
  pattern = re.compile(exclude) if exclude else None
  return partition.map_with_path(
      lambda p, _: not (pattern and pattern.search(p)), tree)


def make_optimizer(optim_cfg: config_dict.ConfigDict, total_steps: int | None,
                   wd_mask, *, lr: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then the update rule with weight decay.

  Weight decay is decoupled and multiplied by the learning rate, applied only
  where `wd_mask` (a bool tree like the params, or a function params -> such
  a tree) is True: by default never norms, biases or embeddings. `lr`
  replaces the schedule built from `total_steps`.
  """
  lr = schedule(optim_cfg, total_steps) if lr is None else lr
  wd = optim_cfg.weight_decay
  name = optim_cfg.name
  moment_dtype = optim_cfg.moment_dtype
  if moment_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"optim.moment_dtype: unknown {moment_dtype!r} "
                     "(float32 | bfloat16)")
  if moment_dtype != "float32" and name != "adamw":
    raise ValueError(f"optim.moment_dtype={moment_dtype} applies to adamw, "
                     f"not optim.name={name!r}")
  if name == "adamw" and moment_dtype != "float32":
    rule = optax.chain(
        scale_by_adam_stored_as(jnp.dtype(moment_dtype), optim_cfg.b1,
                                optim_cfg.b2, optim_cfg.eps),
        optax.add_decayed_weights(wd, wd_mask),
        optax.scale_by_learning_rate(lr))
  elif name == "adamw":
    rule = optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                       weight_decay=wd, mask=wd_mask)
  elif name == "lion":
    rule = optax.lion(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd,
                      mask=wd_mask)
  elif name == "sgd":
    parts = [optax.add_decayed_weights(wd, wd_mask)] if wd else []
    parts.append(optax.sgd(lr, momentum=optim_cfg.b1 or None))
    rule = optax.chain(*parts)
  elif name == "adafactor":
    rule = optax.adafactor(lr, weight_decay_rate=wd or None,
                           weight_decay_mask=wd_mask)
  else:
    raise ValueError(f"optim.name: unknown {name!r} "
                     "(adamw | lion | sgd | adafactor)")
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), rule)
  return rule


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float
                            ) -> optax.GradientTransformation:
  """Adam's direction with both moments STORED in `dtype` (e.g. bfloat16).

  The arithmetic is float32 (moments are widened, updated, bias-corrected,
  then rounded back), so only the storage halves: 4 bytes per weight instead
  of 8. optax.scale_by_adam's mu_dtype covers the first moment only.
  """
  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32),
                                  mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: b1 * f32(m) + (1 - b1) * f32(g),
                      state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)),
                      state.nu, updates)
    direction = jax.tree.map(
        lambda m, v, g: ((m / (1 - b1 ** t))
                         / (jnp.sqrt(v / (1 - b2 ** t)) + eps)).astype(g.dtype),
        mu, nu, updates)
    store = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
    return direction, optax.ScaleByAdamState(count=count, mu=store(mu),
                                             nu=store(nu))

  return optax.GradientTransformation(init, update)


def tree_norm(tree) -> jax.Array:
  """Global L2 norm in float32 (0 for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves))
