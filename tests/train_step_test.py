"""The train step: loss, accumulation, methods, compile-once.

All on one CPU device with the tiny float32 config; mesh invariance is in
sharding_test.py.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import models
from sft_jax.data import config as data_config
from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import loss as loss_lib
from sft_jax.train import partition
from sft_jax.train import sharding
from sft_jax.train import model_setup
from sft_jax.train import step as step_lib

# XLA's CPU backend at -O0 compiles these steps about twice as fast; the
# numbers agree with -O2 to float32 rounding, well inside the tolerances.
_FAST = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, compiler_options=_FAST)

# Plain SGD (lr 1, no clipping): the update IS the gradient, so comparing
# updated params compares gradients without Adam's sign-like amplification.
_SGD = ("--config.optim.name=sgd", "--config.optim.b1=0",
        "--config.optim.lr=1.0", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0",
        "--config.optim.weight_decay=0")


def _cfg(*overrides, arg="", sources=1):
  # One training source ("train"; its file is never read here), then extras.
  cfg = config_lib.get_config_from_file(
      "configs/tiny.py:data=train.jsonl" + (f",{arg}" if arg else ""))
  for i in range(1, sources):
    cfg.data.sources[f"extra{i}"] = data_config.source_config()
  cfg.lock()
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.set_override(cfg, key, value)
  return cfg


def _setup(cfg):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  return mesh, model_cfg, state, shardings


def _batch(cfg, model_cfg, seed=0):
  return {k: jnp.asarray(v) for k, v in bench.synthetic_batch(
      cfg.train.batch_size, cfg.train.seq_len, model_cfg.vocab_size, seed,
      num_sources=len(cfg.data.sources)).items()}


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _reference_losses(model_cfg, variables, batch):
  """Per-token nll and log Z from the full logits (no chunking)."""
  apply = _jit(models.Transformer(model_cfg).apply)
  logits = apply(variables, batch["tokens"], batch["positions"],
                 batch["segment_ids"])
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
      logits.max(-1))
  target = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None],
                              -1)[..., 0]
  correct = logits.argmax(-1) == np.asarray(batch["targets"])
  return log_z - target, log_z, correct


def test_chunked_ce_matches_full_logits_value_and_grads():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (2, 37)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 37)) < 0.7, jnp.float32)
  # Soft-capped logits, as for gemma2: the chunk must use the same function.
  logits_fn = lambda h, w: 3.0 * jnp.tanh(
      jnp.einsum("btd,dv->btv", h, w) / 3.0)

  def objective(fn):
    def f(h, w):
      out = fn(h, w)
      return jnp.sum(out["nll"] * mask) + 0.1 * jnp.sum(
          jnp.square(out["log_z"]) * mask), out
    return f

  chunked = lambda h, w: loss_lib.token_losses(h, w, targets, logits_fn, 8)
  naive = lambda h, w: loss_lib.naive_token_losses(h, w, targets, logits_fn)
  (v1, out1), g1 = _jit(jax.value_and_grad(objective(chunked), (0, 1),
                                           has_aux=True))(hidden, w)
  (v2, out2), g2 = _jit(jax.value_and_grad(objective(naive), (0, 1),
                                           has_aux=True))(hidden, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ("nll", "log_z", "correct"):
    assert out1[key].shape == (2, 37)
    np.testing.assert_allclose(out1[key], out2[key], rtol=1e-6, atol=1e-6)


def test_fused_weighted_ce_matches_full_logits_value_and_grads():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (2, 37)), jnp.int32)
  nll_w = jnp.asarray(rng.random((2, 37)) < 0.7, jnp.float32) / 13.0
  logits_fn = lambda h, w: 3.0 * jnp.tanh(
      jnp.einsum("btd,dv->btv", h, w) / 3.0)

  def fused(h, w):
    return loss_lib.weighted_ce(h, w, targets, nll_w, 0.1 * nll_w,
                                logits_fn, 8)

  def naive(h, w):
    out = loss_lib.naive_token_losses(h, w, targets, logits_fn)
    return jnp.sum(out["nll"] * nll_w + 0.1 * nll_w * out["log_z"]**2), out

  # Scaled by 2.5 outside: the fused backward must apply the cotangent.
  scaled = lambda f: lambda h, w: (2.5 * f(h, w)[0], f(h, w)[1])
  (v1, out1), g1 = _jit(jax.value_and_grad(scaled(fused), (0, 1),
                                           has_aux=True))(hidden, w)
  (v2, out2), g2 = _jit(jax.value_and_grad(scaled(naive), (0, 1),
                                           has_aux=True))(hidden, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ("nll", "log_z", "correct"):
    np.testing.assert_allclose(out1[key], out2[key], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_jit(fused)(hidden, w)[0], v1 / 2.5, rtol=1e-6)


def test_chunked_ce_never_builds_full_logits():
  hidden = jnp.zeros((2, 64, 16))
  w, targets = jnp.zeros((16, 1000)), jnp.zeros((2, 64), jnp.int32)
  fn = lambda h, w: loss_lib.token_losses(
      h, w, targets, lambda a, b: jnp.einsum("btd,dv->btv", a, b), 16)["nll"]
  grad = jax.grad(lambda h, w: jnp.sum(fn(h, w)), (0, 1))
  hlo = jax.jit(grad).lower(hidden, w).as_text()
  assert "2x16x1000" in hlo  # one chunk of logits
  assert "2x64x1000" not in hlo and "128x1000" not in hlo
  fused = lambda h, w: loss_lib.weighted_ce(
      h, w, targets, jnp.ones((2, 64)), jnp.zeros((2, 64)),
      lambda a, b: jnp.einsum("btd,dv->btv", a, b), 16)[0]
  hlo = jax.jit(jax.grad(fused, (0, 1))).lower(hidden, w).as_text()
  assert "2x16x1000" in hlo
  assert "2x64x1000" not in hlo and "128x1000" not in hlo


def test_loss_metrics_and_eval_match_full_logits():
  cfg = _cfg("--config.train.z_loss=0.01", sources=3)
  _, model_cfg, state, _ = _setup(cfg)
  batch = _batch(cfg, model_cfg)
  nll, log_z, correct = _reference_losses(
      model_cfg, step_lib.variables_of(state), batch)
  mask = np.asarray(batch["loss_mask"], np.float64)
  src = np.asarray(batch["source_id"])
  n = mask.sum()
  assert 0 < n < mask.size  # a real mask: supervised and unsupervised tokens

  _, m = _jit(step_lib.make_train_step(cfg, model_cfg))(state, batch)
  np.testing.assert_allclose(m["ce_loss"], (nll * mask).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(m["z_loss"], 0.01 * (log_z**2 * mask).sum() / n,
                             rtol=1e-5)
  np.testing.assert_allclose(m["loss"], m["ce_loss"] + m["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(m["token_accuracy"], (correct * mask).sum() / n,
                             rtol=1e-6)
  assert float(m["num_supervised_tokens"]) == n
  for s in range(3):
    np.testing.assert_allclose(m["source_loss_sum"][s],
                               (nll * mask * (src == s)).sum(), rtol=1e-5)
    assert float(m["source_count"][s]) == (mask * (src == s)).sum()

  sums = _jit(step_lib.make_eval_step(cfg, model_cfg))(state, batch)
  np.testing.assert_allclose(sums["nll_sum"], (nll * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["correct_sum"], (correct * mask).sum())
  assert float(sums["count"]) == n
  np.testing.assert_allclose(sums["source_count"],
                             [(mask * (src == s)).sum() for s in range(3)])


@pytest.mark.parametrize("arg", ["method=full", "method=lora"])
def test_grad_accumulation_equals_one_big_batch(arg):
  results = []
  for k in (1, 4):
    cfg = _cfg(*_SGD, f"--config.train.grad_accum={k}", arg=arg)
    _, model_cfg, state, _ = _setup(cfg)
    batch = _batch(cfg, model_cfg)
    new_state, m = _jit(step_lib.make_train_step(cfg, model_cfg))(
        state, batch)
    results.append((_host(m), _host(new_state.trainable)))
  (m1, p1) = results[0]
  for m, p in results[1:]:
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(m["source_loss_sum"], m1["source_loss_sum"],
                               rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-7), p, p1)
  # Micro-batches differ in supervised tokens, so a mean of per-micro-batch
  # means would differ: the test can tell the two normalisations apart.
  assert m1["grad_norm"] > 0


def test_compiles_once_and_loss_goes_down():
  cfg = _cfg("--config.optim.lr=1e-2", "--config.train.grad_accum=2")
  mesh, model_cfg, state, shardings = _setup(cfg)
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                       compiler_options=_FAST)
  batches = [_batch(cfg, model_cfg, seed=i % 2) for i in range(12)]
  losses = []
  for batch in batches:
    state, m = train_step(state, batch)
    losses.append(float(m["loss"]))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 12
  assert losses[-1] < losses[0] - 0.5, losses


def test_mixed_precision_bf16_params_and_compute():
  cfg = _cfg("--config.model.dtype=bfloat16",
             "--config.model.param_dtype=bfloat16")
  mesh, model_cfg, state, shardings = _setup(cfg)
  batch = _batch(cfg, model_cfg)
  # The same random weights in float32 give the reference loss.
  ref_cfg = dataclasses.replace(model_cfg, dtype="float32",
                                param_dtype="float32")
  ref_vars = jax.tree.map(lambda x: x.astype(jnp.float32),
                          step_lib.variables_of(state))
  nll, _, _ = _reference_losses(ref_cfg, ref_vars, batch)
  mask = np.asarray(batch["loss_mask"])
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                       compiler_options=_FAST)
  losses = []
  for _ in range(3):
    state, m = train_step(state, batch)
    assert m["loss"].dtype == jnp.float32  # softmax and loss in float32
    losses.append(float(m["loss"]))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  # bf16 storage, float32 master weights and optimizer state (the policy of
  # train_precision_test.py).
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves((state.trainable, state.opt_state))
             if jnp.issubdtype(x.dtype, jnp.floating))
  # bf16 compute: the first loss agrees with float32 to bf16 noise.
  np.testing.assert_allclose(losses[0], (nll * mask).sum() / mask.sum(),
                             rtol=1e-2)
  assert losses[-1] < losses[0]


def test_lora_starts_at_base_and_only_lora_has_optimizer_state():
  cfg = _cfg(*_SGD, "--config.optim.lr=0.5", arg="method=lora")
  _, model_cfg, state, _ = _setup(cfg)
  assert set(state.trainable) == {"lora"}
  assert set(state.frozen) == {"params"}
  batch = _batch(cfg, model_cfg)

  base_cfg = dataclasses.replace(model_cfg, lora=None)
  base_nll, _, _ = _reference_losses(base_cfg, state.frozen, batch)
  mask = np.asarray(batch["loss_mask"])
  frozen_before = _host(state.frozen)

  train_step = _jit(step_lib.make_train_step(cfg, model_cfg))
  state1, m = train_step(state, batch)
  np.testing.assert_allclose(m["ce_loss"], (base_nll * mask).sum() / mask.sum(),
                             rtol=1e-5)
  state2, m2 = train_step(state1, batch)
  assert m2["loss"] < m["loss"]
  jax.tree.map(np.testing.assert_array_equal, _host(state2.frozen),
               frozen_before)
  bs = [x for p, x in partition.flat(state2.trainable).items()
        if p.endswith("/b")]
  assert bs and all(np.abs(np.asarray(b)).max() > 0 for b in bs)

  report = step_lib.param_report(cfg, model_cfg, state)
  lora_size = sum(x.size for x in jax.tree.leaves(state.trainable))
  assert report["trainable_params"] == lora_size
  assert report["total_params"] == lora_size + sum(
      x.size for x in jax.tree.leaves(state.frozen))
  # Adam keeps two moments per LoRA weight (plus a step count), nothing for
  # the frozen base.
  adam_cfg = _cfg(arg="method=lora")
  _, _, adam_state, _ = _setup(adam_cfg)
  report = step_lib.param_report(adam_cfg, model_cfg, adam_state)
  assert 2 * lora_size * 4 <= report["opt_state_bytes"] <= (
      2 * lora_size * 4 + 64)


def test_freeze_trains_only_the_top_layer():
  cfg = _cfg("--config.optim.lr=1e-2", arg="method=freeze")
  _, model_cfg, state, _ = _setup(cfg)
  flat_trainable = partition.flat(state.trainable)
  assert flat_trainable and all(p.startswith("params/layers/")
                                for p in flat_trainable)
  before = partition.flat(_host(step_lib.variables_of(state)))
  train_step = _jit(step_lib.make_train_step(cfg, model_cfg))
  for seed in range(2):
    state, _ = train_step(state, _batch(cfg, model_cfg, seed))
  after = partition.flat(_host(step_lib.variables_of(state)))
  for path, old in before.items():
    new = after[path]
    if path.startswith("params/layers/"):
      np.testing.assert_array_equal(new[0], old[0])  # bottom layer frozen
      assert np.abs(new[1] - old[1]).max() > 0, path  # top layer trains
    else:
      np.testing.assert_array_equal(new, old)  # embedder, final norm, head
  # Only the top layer is in the trainable state (see train_freeze_test.py).
  report = step_lib.param_report(cfg, model_cfg, state)
  layer_params = sum(x.size for p, x in before.items()
                     if p.startswith("params/layers/"))
  assert report["trainable_params"] == layer_params // 2


def test_freeze_by_regex_has_optimizer_state_only_for_matches():
  cfg = _cfg("--config.method.name=freeze",
             "--config.method.trainable=^lm_head|^final_norm")
  _, model_cfg, state, _ = _setup(cfg)
  assert sorted(partition.flat(state.trainable)) == [
      "params/final_norm/scale", "params/lm_head/kernel"]
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  assert 2 * trainable_bytes <= opt_bytes <= 2 * trainable_bytes + 64
  with pytest.raises(ValueError, match="matches no parameter"):
    step_lib.split_trainable(
        _cfg("--config.method.name=freeze", "--config.method.trainable=nope"),
        step_lib.variables_of(state))


@pytest.fixture(scope="module")
def decay_and_skip():
  """AdamW with weight decay and on_nonfinite=skip, compiled once."""
  cfg = _cfg("--config.optim.lr=0.5", "--config.optim.weight_decay=0.1",
             "--config.optim.schedule=constant",
             "--config.optim.warmup_steps=0",
             "--config.train.on_nonfinite=skip")
  _, model_cfg, state, _ = _setup(cfg)
  return (cfg, model_cfg, state, _batch(cfg, model_cfg),
          _jit(step_lib.make_train_step(cfg, model_cfg)))


def test_weight_decay_skips_norms_and_embeddings(decay_and_skip):
  # No supervised tokens: zero gradients, so AdamW moves params by weight
  # decay alone: p <- p * (1 - lr * wd) where decayed, unchanged elsewhere.
  _, _, state, batch, train_step = decay_and_skip
  batch = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  before = partition.flat(_host(state.trainable))
  state, m = train_step(state, batch)
  assert float(m["grad_norm"]) == 0.0
  after = partition.flat(_host(state.trainable))
  decayed = set()
  for path, old in before.items():
    if np.allclose(after[path], old * 0.95, rtol=1e-6):
      decayed.add(path)
    else:
      np.testing.assert_array_equal(after[path], old)
  assert decayed == {p for p in before if p.endswith("kernel")}
  assert "params/embedder/embedding" not in decayed


def test_nonfinite_update_is_skipped_when_configured(decay_and_skip):
  _, _, state, batch, train_step = decay_and_skip
  flat = partition.flat(state.trainable)
  flat["params/final_norm/scale"] = flat["params/final_norm/scale"].at[0].set(
      jnp.nan)
  state = state.replace(trainable=partition.unflat(flat))
  before = _host((state.trainable, state.opt_state))
  new, m = train_step(state, batch)
  assert float(m["finite"]) == 0.0 and float(m["skipped"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal,
               _host((new.trainable, new.opt_state)), before)
  assert int(new.step) == 1


def test_bench_prints_consistent_figures(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["--config", "configs/tiny.py:method=lora", "--steps", "2",
                     "--warmup", "0", "--config.train.seq_len=32",
                     "--out", str(out)]) == 0
  figures = json.loads(capsys.readouterr().out)
  assert figures == json.loads(out.read_text())
  assert figures["method"] == "lora" and figures["seq_len"] == 32
  np.testing.assert_allclose(figures["tokens_per_s"],
                             8 * 32 / figures["step_s"], rtol=1e-3)
  assert figures["compile_s"] > 0 and figures["mfu"] is None  # CPU
  assert figures["trainable_params"] < figures["total_params"]
  assert np.isfinite(figures["loss"])
  # The compiled step's memory and collectives (8 devices, fsdp=8).
  assert figures["memory"]["temp_bytes"] == figures["compiled_temp_bytes"] > 0
  assert figures["collectives"]["all-gather"]["count"] > 0
  assert figures["collectives"]["all-gather"]["bytes"] > 0


def test_lora_starts_from_a_peft_adapter(tmp_path):
  """method.lora.init_adapter: continue training an exported PEFT adapter."""
  from sft_jax.infer import export  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py:method=lora")
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  # Non-zero B, so the adapter is not the identity and order matters.
  leaves, treedef = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  lora = jax.tree.unflatten(treedef, [
      np.asarray(x) + 0.05 * np.asarray(jax.random.normal(k, x.shape))
      for x, k in zip(leaves, keys)])
  export.export_adapter(model_cfg, lora, str(tmp_path / "adapter"),
                        base_model="tiny-base")
  cfg2 = config_lib.load_config("configs/tiny.py:method=lora", [
      f"--config.method.lora.init_adapter={tmp_path / 'adapter'}"])
  _, variables2 = model_setup.load_or_init_model(cfg2, mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(b), a, rtol=1e-6, atol=1e-7), lora, variables2["lora"])
  # The base weights are untouched by the adapter.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b)), variables["params"], variables2["params"])
