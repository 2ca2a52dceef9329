"""The optimizers, their schedules and weight-decay masks.

adamw with bfloat16-stored moments (optim.moment_dtype): half the state,
the same trajectory as float32 moments to bf16 rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_jax.train import config as config_lib
from sft_jax.train import optim
from sft_jax.train import partition


def _tx(moment_dtype):
  cfg = config_lib.load_config("configs/tiny.py", [
      f"--config.optim.moment_dtype={moment_dtype}", "--config.optim.lr=0.01",
      "--config.optim.weight_decay=0.1", "--config.optim.warmup_steps=0",
      "--config.optim.schedule=constant", "--config.optim.clip_norm=0"])
  params = {"w": {"kernel": jnp.ones((64, 32))}, "norm": {"scale": jnp.ones(32)}}
  return optim.make_optimizer(cfg.optim, 100, optim.weight_decay_mask(
      params, cfg.optim.wd_exclude)), params


def _run(moment_dtype, steps=30):
  tx, params = _tx(moment_dtype)
  target = jax.random.normal(jax.random.key(0), (64, 32))
  loss = lambda p: (jnp.sum(jnp.square(p["w"]["kernel"] - target))
                    + jnp.sum(jnp.square(p["norm"]["scale"] - 0.5)))
  return _minimise(tx, loss, params, steps)


def _minimise(tx, loss, params, steps):
  """(params, optimizer state) after `steps` updates of `tx` on `loss`."""

  @jax.jit
  def run(params):
    def body(_, carry):
      params, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state,
                                     params)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return run(params)


def test_bf16_moments_halve_the_state_and_follow_float32_adamw():
  p32, s32 = _run("float32")
  p16, s16 = _run("bfloat16")
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  params = 64 * 32 + 32
  assert nbytes(s32) - 8 * params <= 16 and nbytes(s16) - 4 * params <= 16
  assert {x.dtype for x in jax.tree.leaves(s16) if x.ndim} == {
      jnp.dtype(jnp.bfloat16)}
  # 30 steps of lr 0.01 move each weight by up to 0.3; the two agree to a
  # small fraction of that.
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    moved = np.abs(np.asarray(a) - 1).max()
    assert moved > 0.2
    np.testing.assert_allclose(a, b, atol=0.01 * moved)


def test_moment_dtype_is_checked():
  with pytest.raises(ValueError, match="optim.moment_dtype"):
    _tx("float16")


def _cfg(*overrides):
  return config_lib.load_config("configs/tiny.py", list(overrides))


def test_weight_decay_mask_by_path():
  tree = {"embedder": {"embedding": 0}, "layers": {
      "attn": {"q_proj": {"kernel": 0, "bias": 0}},
      "input_norm": {"scale": 0}}}
  assert partition.flat(optim.weight_decay_mask(tree, r"norm|bias|embed")) == {
      "embedder/embedding": False, "layers/attn/q_proj/kernel": True,
      "layers/attn/q_proj/bias": False, "layers/input_norm/scale": False}


def test_schedule_warmup_then_decay():
  cfg = _cfg("--config.optim.lr=1e-3", "--config.optim.warmup_steps=4",
             "--config.optim.end_lr_ratio=0.1", "--config.train.steps=44")
  values = {}
  for name in ("cosine", "linear", "constant"):
    config_lib.set_override(cfg, "optim.schedule", name)
    sched = optim.schedule(cfg.optim, cfg.train.steps)
    values[name] = [float(sched(s)) for s in (0, 2, 4, 24, 44)]
  np.testing.assert_allclose(values["cosine"],
                             [0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  np.testing.assert_allclose(values["linear"],
                             [0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  np.testing.assert_allclose(values["constant"],
                             [0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "adafactor"])
def test_optimizers_minimise_a_quadratic(name):
  cfg = _cfg(f"--config.optim.name={name}", "--config.optim.lr=0.05",
             "--config.optim.weight_decay=0.01", "--config.optim.clip_norm=1")
  params = {"w": {"kernel": jnp.ones((4, 3))}, "norm": {"scale": jnp.ones(3)}}
  tx = optim.make_optimizer(cfg.optim, 100, optim.weight_decay_mask(
      params, cfg.optim.wd_exclude))
  loss = lambda p: sum(jnp.sum(jnp.square(x - 0.5)) for x in
                       jax.tree.leaves(p))
  final, _ = _minimise(tx, loss, params, 20)
  assert float(loss(final)) < 0.7 * float(loss(params))
