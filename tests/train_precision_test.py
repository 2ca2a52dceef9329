"""The precision policy: float32 trainable weights and optimizer state.

A bf16 weight w cannot take an update smaller than half its ulp (|w| 2^-9);
these tests use updates far below that and check that they land by default
and are lost only under the explicit pure-bf16 option.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import model_setup
from sft_jax.train import partition
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

_FAST = {"xla_backend_optimization_level": 0}


def _cfg(*overrides, arg=""):
  cfg = config_lib.get_config_from_file(
      "configs/tiny.py" + (f":{arg}" if arg else ""))
  cfg.lock()
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.set_override(cfg, key, value)
  return cfg


def _state_and_step(cfg):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(
      cfg.train.batch_size, cfg.train.seq_len, model_cfg.vocab_size, 0).items()}
  step = jax.jit(step_lib.make_train_step(cfg, model_cfg),
                 compiler_options=_FAST)
  return state, functools.partial(step, batch=batch)


def _kernels(state):
  return {p: np.asarray(x, np.float32)
          for p, x in partition.flat(state.trainable).items()
          if p.endswith("kernel")}


_SGD = ("--config.optim.name=sgd", "--config.optim.b1=0",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.optim.clip_norm=0", "--config.optim.weight_decay=0",
        "--config.model.param_dtype=bfloat16")


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def test_full_ft_on_bf16_storage_keeps_float32_master_weights():
  # SGD at lr 1e-3 moves each weight by a median 4e-8 (q_proj) to 4e-6
  # (v_proj): one to three orders below the bf16 half-ulp of a typical
  # weight (0.013 * 2^-9 = 2.5e-5).
  state, step = _state_and_step(_cfg(*_SGD, "--config.optim.lr=1e-3"))
  assert _float_dtypes((state.trainable, state.opt_state)) == {
      jnp.dtype(jnp.float32)}
  before = _kernels(state)
  after = _kernels(step(state)[0])
  for path, w in after.items():
    moved = np.mean(w != before[path])
    assert moved > 0.98, (path, moved)


def test_pure_bf16_is_explicit_and_loses_small_updates():
  state, step = _state_and_step(_cfg(*_SGD, "--config.optim.lr=1e-3",
                                     "--config.model.trainable_dtype=bfloat16"))
  assert _float_dtypes((state.trainable, state.opt_state)) == {
      jnp.dtype(jnp.bfloat16)}
  before = _kernels(state)
  after = _kernels(step(state)[0])
  # Only weights near zero (small ulp) move: 0-7% per kernel, against more
  # than 98% with float32 master weights.
  assert max(np.mean(after[p] != before[p]) for p in after) < 0.1


@pytest.mark.parametrize("trainable_dtype", ["float32", "bfloat16"])
def test_lora_adapters_over_a_bf16_base_train_in_float32(trainable_dtype):
  # AdamW at the presets' final rate: each step moves an adapter weight by
  # about lr = 2e-5, below the bf16 half-ulp of most A entries (~1/8 * 2^-9).
  cfg = _cfg("--config.model.param_dtype=bfloat16",
             "--config.optim.lr=2e-5", "--config.optim.schedule=constant",
             "--config.optim.warmup_steps=0", "--config.optim.weight_decay=0",
             f"--config.model.trainable_dtype={trainable_dtype}",
             arg="method=lora")
  state, step = _state_and_step(cfg)
  want = jnp.dtype(trainable_dtype)
  assert _float_dtypes((state.trainable, state.opt_state)) == {want}
  assert _float_dtypes(state.frozen) == {jnp.dtype(jnp.bfloat16)}
  a_before = {p: np.asarray(x, np.float32)
              for p, x in partition.flat(state.trainable).items()
              if p.endswith("/a")}
  for _ in range(2):  # B = 0 at first: A's gradient is zero in step one.
    state, _ = step(state)
  moved = np.mean([np.mean(np.asarray(partition.flat(state.trainable)[p],
                                      np.float32) != a)
                   for p, a in a_before.items()])
  if trainable_dtype == "float32":
    assert moved > 0.99, moved
  else:
    assert moved < 0.5, moved  # the defect of pure bf16 adapters


def test_unknown_trainable_dtype_is_rejected():
  with pytest.raises(ValueError, match="model.trainable_dtype"):
    step_lib.trainable_dtype(_cfg("--config.model.trainable_dtype=float16"))
