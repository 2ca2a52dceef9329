"""train_top_layers: only the top layers have state, gradients and updates,
and the split changes nothing else (sft_jax/train/freeze.py)."""


import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import freeze
from sft_jax.train import model_setup
from sft_jax.train import partition
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

_FAST = {"xla_backend_optimization_level": 0}
_SGD = ("--config.optim.name=sgd", "--config.optim.b1=0",
        "--config.optim.lr=1.0", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0",
        "--config.optim.weight_decay=0", "--config.method.name=freeze",
        "--config.method.trainable=^layers/|^final_norm")


def _run(top):
  cfg = config_lib.load_config("configs/tiny.py", list(_SGD) + [
      f"--config.method.train_top_layers={top}"])
  mesh = sharding.make_mesh(cfg.mesh)  # 8 devices: split leaves stay sharded
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  before = jax.tree.map(np.asarray, step_lib.variables_of(state))
  report = step_lib.param_report(cfg, model_cfg, state)
  batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(
      8, cfg.train.seq_len, model_cfg.vocab_size, 0).items()}
  step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                 compiler_options=_FAST)
  state, metrics = step(state, batch)
  return state, before, report, metrics


def test_top_layer_split_equals_training_all_layers_sliced():
  # SGD at lr 1: the update is minus the gradient. Training the top layer
  # of 2 must move it exactly as training both layers does.
  split, before, split_report, split_m = _run(top=1)
  full, _, full_report, full_m = _run(top=0)
  assert "frozen_layers" in split.frozen["params"]
  np.testing.assert_allclose(split_m["loss"], full_m["loss"], rtol=1e-6)
  after_split = partition.flat(jax.tree.map(
      np.asarray, step_lib.variables_of(split)))
  after_full = partition.flat(jax.tree.map(
      np.asarray, step_lib.variables_of(full)))
  for path, old in partition.flat(before).items():
    new = after_split[path]
    assert new.shape == old.shape, path  # the one [L, ...] tree, unchanged
    if path.startswith("params/layers/"):
      np.testing.assert_array_equal(new[0], old[0])  # bottom: never moves
      np.testing.assert_allclose(new[1], after_full[path][1], atol=1e-6)
    elif path.startswith("params/final_norm"):
      np.testing.assert_allclose(new, after_full[path], atol=1e-6)
    else:
      np.testing.assert_array_equal(new, old)
  # State for one layer of two (plus the final norm), not for both.
  layers = sum(x.size for p, x in partition.flat(before).items()
               if p.startswith("params/layers/"))
  norm = before["params"]["final_norm"]["scale"].size
  assert full_report["trainable_params"] == layers + norm
  assert split_report["trainable_params"] == layers // 2 + norm
  # SGD without momentum has no per-weight state; the trainable weights
  # themselves (float32 master copies) halve with the split.
  assert split_report["trainable_bytes"] == 4 * (layers // 2 + norm)


def test_join_layers_inverts_the_split():
  x = {"layers": {"mlp": {"kernel": jnp.arange(24.0).reshape(3, 2, 4)}},
       "embedder": {"embedding": jnp.ones((5, 2))}}
  hit, rest = partition.split(x, "^layers/")
  trainable, frozen = freeze.split_layers(hit, rest, 2)
  assert trainable["layers"]["mlp"]["kernel"].shape == (1, 2, 4)
  assert frozen["frozen_layers"]["mlp"]["kernel"].shape == (2, 2, 4)
  joined = freeze.join_layers({"params": partition.merge(trainable, frozen)})
  jax.tree.map(np.testing.assert_array_equal, joined["params"], x)
