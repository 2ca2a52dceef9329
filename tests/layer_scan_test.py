"""Layers scanned in groups of one attention pattern: plan, program, numbers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import models
from sft_jax.models import attention as attention_lib
from sft_jax.models import layer_scan
from sft_jax.models.config import FULL, SLIDING
from sft_jax.train import freeze

S, F = SLIDING, FULL
_W = 5  # the sliding window


def test_scan_plan_covers_the_families_with_few_bodies():
  gemma2 = [_W, 0] * 13
  gemma3 = ([_W] * 5 + [0]) * 4 + [_W] * 2  # Gemma-3-1B: 26 layers
  qwen = [0] * 21 + [_W] * 7  # max_window_layers=21
  assert layer_scan.scan_plan(gemma2) == (((_W, 0), 13),)
  assert layer_scan.scan_plan(gemma3) == (((_W,) * 5 + (0,), 4), ((_W,), 2))
  assert layer_scan.scan_plan(qwen) == (((0,), 21), ((_W,), 7))
  assert layer_scan.scan_plan([0] * 16) == (((0,), 16),)
  assert layer_scan.scan_plan([_W]) == (((_W,), 1),)
  # Every plan lists the layers' windows in order.
  for ws in (gemma2, gemma3, qwen, [0, _W, _W, 0, _W], gemma3[5:]):
    plan = layer_scan.scan_plan(ws)
    assert [w for period, k in plan for _ in range(k) for w in period] == ws


# Gemma-3-like (2 local layers to 1 global), 7 layers: a scan of 2 groups of
# 3 patterns, then a sliding layer; LoRA (with dropout) on every
# projection, soft-cap, post norms.
_CFG = models.ModelConfig(
    model_type="gemma3_text", vocab_size=61, hidden_size=32,
    intermediate_size=48, num_layers=7, num_heads=4, num_kv_heads=2,
    head_dim=8, sliding_window=_W, layer_types=(S, S, F) * 2 + (S,),
    attn_softcap=5.0, post_norms=True, norm_plus_one=True,
    rope_local=models.RopeConfig(theta=100.0), activation="gelu_tanh",
    lora=models.LoraConfig(rank=2, alpha=4.0, dropout=0.5))
_T = 16


def _batch():
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 61, (2, _T)).astype(np.int32)
  pos = np.stack([np.arange(_T), np.r_[np.arange(9), np.arange(5),
                                       np.zeros(2)]]).astype(np.int32)
  seg = np.stack([np.ones(_T), np.r_[np.ones(9), 2 * np.ones(5),
                                     np.zeros(2)]]).astype(np.int32)
  return tokens, pos, seg


@functools.lru_cache(maxsize=1)
def _variables():
  v = models.init(_CFG, jax.random.key(0))
  rng = np.random.RandomState(1)  # b != 0, so the adapters count
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(
      size=x.shape).astype(np.float32), v)


def _loss_fn(cfg):
  model = models.Transformer(cfg)
  tokens, pos, seg = _batch()

  def loss(variables, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    logits = model.apply(variables, tokens, pos, seg, rngs=rngs)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
  return loss


def test_each_layer_compiles_its_own_static_window(monkeypatch):
  windows = []
  real = attention_lib.attention

  def spy(*args, window=None, **kwargs):
    windows.append(window)
    return real(*args, window=window, **kwargs)

  monkeypatch.setattr(attention_lib, "attention", spy)
  hlo = jax.jit(_loss_fn(_CFG)).lower(_variables()).as_text()
  # No per-layer choice among patterns (lax.switch lowers to a case), and
  # one loop per piece of the plan: the 3-layer groups, the last layer.
  assert "stablehlo.case" not in hlo
  assert hlo.count("stablehlo.while") == 2
  # Every attention call sees its window as a Python int (None: global).
  assert set(windows) == {_W, None} and all(
      w is None or type(w) is int for w in windows), windows


def test_grouped_scan_equals_layer_by_layer(monkeypatch):
  variables = _variables()
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(_CFG)))(variables)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
  # Each layer a piece of its own: a per-layer loop, as a reference.
  monkeypatch.setattr(layer_scan, "scan_plan",
                      lambda ws: tuple(((int(w),), 1) for w in ws))
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss_fn(_CFG)))(
      variables)
  np.testing.assert_allclose(ref_loss, loss, atol=1e-6, rtol=0)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5,
                                 rtol=0), ref_grads, grads)


def test_lora_dropout_draws_a_different_mask_per_layer(monkeypatch):
  keys = []
  real = jax.random.bernoulli

  def spy(key, p, shape):
    jax.debug.callback(lambda k: keys.append(tuple(np.ravel(k))),
                       jax.random.key_data(key))
    return real(key, p, shape)

  monkeypatch.setattr(jax.random, "bernoulli", spy)
  jax.block_until_ready(jax.jit(_loss_fn(_CFG))(_variables(),
                                                jax.random.key(3)))
  jax.effects_barrier()
  assert len(keys) == 7 * 7 and len(set(keys)) == len(keys)


def test_frozen_bottom_split_gives_the_same_loss():
  params, cfg = _variables()["params"], dataclasses.replace(_CFG, lora=None)
  frozen = 4  # the top scan starts mid-period
  _, rest = freeze.split_layers({}, jax.tree.map(jnp.asarray, params),
                                 frozen)
  got = jax.jit(_loss_fn(dataclasses.replace(cfg, frozen_layers=frozen)))(
      {"params": rest})
  want = jax.jit(_loss_fn(cfg))({"params": params})
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets,modules", [
    (r"^layers/attn/q_proj$", ["layers/attn/q_proj"]),
    (r"mlp/down", ["layers/mlp/down_proj"])])
def test_lora_targets_match_the_logical_module_path(targets, modules):
  cfg = dataclasses.replace(_CFG, lora=models.LoraConfig(targets=targets))
  lora = jax.eval_shape(functools.partial(models.init, cfg),
                        jax.random.key(0))["lora"]
  assert sorted(models.lora_modules(lora)) == modules
  assert jax.tree.leaves(lora)[0].shape[0] == 7
