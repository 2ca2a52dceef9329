"""Mesh, logical-axis rules, direct-into-shard init/load, mesh invariance.

Runs on the 8 simulated CPU devices of conftest.py.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from sft_jax import models
from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import partition
from sft_jax.train import sharding
from sft_jax.train import model_setup
from sft_jax.train import step as step_lib

_FAST = {"xla_backend_optimization_level": 0}
_SGD = ("--config.optim.name=sgd", "--config.optim.b1=0",
        "--config.optim.lr=1.0", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0",
        "--config.optim.weight_decay=0")


def _mesh_cfg(data, fsdp, tensor):
  return config_dict.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def _rules():
  cfg = config_lib.load_config("configs/tiny.py")
  return sharding.rules_from_config(cfg.sharding.rules)


def test_mesh_shape_fills_one_axis_and_rejects_bad_shapes():
  assert sharding.mesh_shape(_mesh_cfg(2, -1, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_cfg(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(_mesh_cfg(-1, -1, 1), 8)
  with pytest.raises(ValueError, match="needs 4 devices, 8 available"):
    sharding.mesh_shape(_mesh_cfg(2, 2, 1), 8)
  with pytest.raises(ValueError, match="not a multiple of 3"):
    sharding.mesh_shape(_mesh_cfg(3, -1, 1), 8)
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_logical_rules_respect_divisibility_and_use_each_axis_once():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  rules = _rules()
  spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh, rules)
  assert spec(("layers", "embed", "mlp"), (2, 64, 128)) == P(
      None, "fsdp", "tensor")
  assert spec(("vocab", "embed"), (320, 64)) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), (97, 64)) == P(None, "fsdp")  # 97 is odd
  assert spec(("batch", "length"), (8, 64)) == P(("data", "fsdp"), None)
  assert spec(("batch", "length"), (2, 64)) == P("data", None)
  assert spec(("embed", "embed"), (64, 64)) == P("fsdp", None)
  with pytest.raises(ValueError, match="no sharding rule"):
    spec(("nonsense",), (4,))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config(config_dict.ConfigDict({"embed": "model"}))


def _expected_spec(mesh, axes, shape):
  return sharding.logical_to_spec(axes, shape, mesh, _rules())


def test_random_init_lands_in_shards_with_optimizer_state_alike():
  cfg = config_lib.load_config("configs/tiny.py", [
      "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"])
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  axes = partition.flat(models.logical_axes(model_cfg))
  for path, x in partition.flat(variables).items():
    assert x.sharding.spec == _expected_spec(mesh, axes[path], x.shape), path
  kernel = variables["params"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  l, d, f = kernel.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(l, d // 4,
                                                                f // 2)}

  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  mu = state.opt_state[1][0].mu  # clip, then adamw's (adam, decay, lr)
  for m, p in zip(jax.tree.leaves(mu), jax.tree.leaves(state.trainable)):
    assert m.sharding.is_equivalent_to(p.sharding, m.ndim)
  for x, s in zip(jax.tree.leaves(state.opt_state),
                  jax.tree.leaves(shardings.opt_state)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def test_pretrained_loads_into_shards_and_lora_starts_at_zero(tmp_path):
  import tiny_hf  # pylint: disable=g-import-not-at-top
  path = tiny_hf.make_tiny_hf("llama", tmp_path / "llama")
  cfg = config_lib.load_config(f"configs/tiny.py:model={path},method=lora", [
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"])
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  assert model_cfg.vocab_size == 97 and model_cfg.lora.rank == 4
  _, reference = models.load_hf(path, dtype="float32")
  axes = partition.flat(models.logical_axes(model_cfg))
  flat_ref = partition.flat(reference)
  for p, x in partition.flat(variables["params"]).items():
    assert x.sharding.spec == _expected_spec(mesh, axes["params/" + p],
                                             x.shape), p
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_ref[p]))
  for p, x in partition.flat(variables["lora"]).items():
    assert x.sharding.spec == _expected_spec(mesh, axes["lora/" + p],
                                             x.shape), p
    if p.endswith("/b"):
      assert not np.asarray(x).any()


def _one_step(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  batch = sharding.global_batch(bench.synthetic_batch(
      cfg.train.batch_size, cfg.train.seq_len, model_cfg.vocab_size, 0), mesh)
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                       compiler_options=_FAST)
  state, metrics = train_step(state, batch)
  return jax.tree.map(np.asarray, (metrics, state.trainable))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_mesh_shape_equals_one_device(method):
  def cfg_for(mesh, accum=1):
    d, f, t = mesh
    return config_lib.load_config(f"configs/tiny.py:method={method}", [
        *_SGD, "--config.train.batch_size=16", f"--config.mesh.data={d}",
        f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
        f"--config.train.grad_accum={accum}"])

  ref_metrics, ref_params = _one_step(cfg_for((1, 1, 1)), jax.devices()[:1])
  meshes = ([((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((1, 4, 2), 2)]
            if method == "full" else [((2, 2, 2), 2)])
  for mesh, accum in meshes:
    metrics, params = _one_step(cfg_for(mesh, accum), jax.devices())
    for key in ("loss", "grad_norm", "num_supervised_tokens"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5,
                                 err_msg=f"{key} on mesh {mesh}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6, err_msg=f"params on mesh {mesh}"),
                 params, ref_params)


def test_batch_rows_must_split_over_mesh_and_accumulation():
  cfg = config_lib.load_config("configs/tiny.py", [
      "--config.train.grad_accum=2", "--config.mesh.fsdp=8"])
  mesh = sharding.make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match="train.batch_size=8 must be a multiple"):
    step_lib.jit_train_step(cfg, None, mesh, None)


def test_activation_constraints_apply_only_under_a_mesh():
  from sft_jax.models import sharding as model_sharding  # pylint: disable=g-import-not-at-top
  x = np.zeros((8, 64, 32), np.float32)
  axes = ("batch", "length", "act_embed")
  plain = jax.make_jaxpr(lambda x: model_sharding.constrain(x, axes))(x)
  assert "sharding_constraint" not in str(plain)
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  rules = dict(_rules(), length=("tensor",))

  @jax.jit
  def f(x):
    with models.activation_sharding(mesh, rules):
      return model_sharding.constrain(x * 2, axes)
  assert f(x).sharding.spec in (P(("data", "fsdp"), "tensor", None),
                                 P(("data", "fsdp"), "tensor"))


def test_sequence_sharded_activations_equal_one_device():
  """rules.length on a mesh axis: positions split over devices, same step."""
  def cfg_for(mesh, length_rule):
    d, f, t = mesh
    return config_lib.load_config("configs/tiny.py", [
        *_SGD, f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}",
        f"--config.mesh.tensor={t}",
        f"--config.sharding.rules.length={length_rule}"])
  ref_metrics, ref_params = _one_step(cfg_for((1, 1, 1), ""),
                                      jax.devices()[:1])
  metrics, params = _one_step(cfg_for((2, 1, 4), "tensor"), jax.devices())
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)


def test_activation_axes_without_rules_stay_unconstrained():
  from sft_jax.models import sharding as model_sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  old_rules = {k: v for k, v in _rules().items() if not k.startswith("act_")}
  x = np.zeros((8, 64, 32), np.float32)

  def f(x):
    with models.activation_sharding(mesh, old_rules):
      return model_sharding.constrain(x, ("batch", "length", "act_embed"))
  assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))


def test_kernels_gather_over_batch_axes_and_dense_rows_stay_put():
  """The one-dot pattern XLA mis-partitions, through `gathered_matmul`.

  h [4, T, F] rows over (data, fsdp) and F over tensor, w [F, D] over
  (tensor, fsdp), y's D over tensor, one row per device: without the kernel
  constraint XLA returns rows 1 and 2 swapped.
  """
  from sft_jax.models import sharding as model_sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  rules = _rules()
  rng = np.random.default_rng(0)
  h = rng.standard_normal((4, 16, 48)).astype(np.float32)
  w = rng.standard_normal((48, 32)).astype(np.float32)
  shard = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  h_s = shard(h, ("data", "fsdp"), None, "tensor")
  w_s = shard(w, "tensor", "fsdp")

  @jax.jit
  def f(h, w):
    with models.activation_sharding(mesh, rules):
      y = model_sharding.gathered_matmul(h, w, ("layers", "mlp", "down_proj"))
      return model_sharding.constrain(y, ("batch", "length", "act_embed"))
  np.testing.assert_allclose(f(h_s, w_s), np.einsum("btf,fd->btd", h, w),
                             rtol=1e-5, atol=1e-5)
  # The kernel keeps its tensor split and loses only the batch axes.
  jaxpr = str(jax.make_jaxpr(f)(h_s, w_s))
  assert "P('tensor', None)" in jaxpr or "P('tensor',)" in jaxpr, jaxpr
  # Without a mesh, or for a module without logical axes, nothing changes.
  assert model_sharding.constrain_kernel(w, ("layers", "mlp", "down_proj")) is w
  with models.activation_sharding(mesh, rules):
    assert model_sharding.constrain_kernel(w, ("head", "proj")) is w


def test_tensor_sharded_residual_with_accumulation_equals_one_device():
  """act_embed on "tensor", grad_accum=2, one row per device per micro-batch."""
  def cfg_for(mesh, accum):
    d, f, t = mesh
    return config_lib.load_config("configs/tiny.py", [
        *_SGD, "--config.train.batch_size=8", f"--config.mesh.data={d}",
        f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
        f"--config.train.grad_accum={accum}",
        "--config.sharding.rules.act_embed=tensor"])
  ref_metrics, ref_params = _one_step(cfg_for((1, 1, 1), 1),
                                      jax.devices()[:1])
  metrics, params = _one_step(cfg_for((2, 2, 2), 2), jax.devices())
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)
