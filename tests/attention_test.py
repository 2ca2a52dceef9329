"""Every attention backend against the `xla` reference on packed GQA rows."""

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models import attention as attention_lib
from sft_jax.models import attention_chunked
from sft_jax.models import attention_gpu
from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import model_setup
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

# Row 0: three segments then padding; row 1: padding first, then two segments
# (boundaries not on any block edge). Positions restart in every segment.
_RUNS = (((1, 37), (2, 29), (3, 21), (0, 13)),
         ((0, 5), (1, 58), (2, 37)))
_T = 100
B, H, N, K = 2, 4, 2, 16
# name -> (window, softcap): the three kinds of layer the families use.
KINDS = {"causal": (None, None), "sliding": (9, None),
         "softcap_sliding": (9, 3.0), "softcap": (None, 3.0)}


def packed_batch():
  seg = np.zeros((B, _T), np.int32)
  pos = np.zeros((B, _T), np.int32)
  for b, runs in enumerate(_RUNS):
    i = 0
    for s, n in runs:
      seg[b, i:i + n] = s
      pos[b, i:i + n] = np.arange(n)
      i += n
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(B, _T, x, K)), jnp.float32)
             for x in (H, N, N))
  return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def _out_and_grads(fn, window, softcap):
  q, k, v, pos, seg = packed_batch()
  valid = (seg != 0)[:, :, None, None]
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, _T, H, K)),
                  jnp.float32)

  def loss(q, k, v):
    out = fn(q, k, v, pos, seg, pos, seg, window=window, softcap=softcap,
             scale=K ** -0.5, mode="train")
    return jnp.sum(jnp.where(valid, out * w, 0.0)), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  return jnp.where(valid, out, 0.0), grads


def contract_error(fn, kind) -> float:
  """Largest |difference| from xla over valid outputs and dq, dk, dv."""
  window, softcap = KINDS[kind]
  ref = _out_and_grads(attention_lib.backend("xla"), window, softcap)
  got = _out_and_grads(fn, window, softcap)
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(ref), jax.tree.leaves(got)))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_xla_chunked_meets_the_contract(kind, monkeypatch):
  # Blocks of 16 over T=100: padding to 112, block skipping in every row.
  monkeypatch.setattr(attention_chunked, "_CHUNK", 16)
  assert contract_error(attention_lib.backend("xla_chunked"), kind) < 1e-5


@pytest.mark.parametrize("kind", ["causal", "softcap_sliding"])
def test_splash_meets_the_contract_in_interpret_mode(kind):
  assert contract_error(attention_lib.backend("splash"), kind) < 2e-4


def test_splash_under_a_mesh_runs_per_shard():
  # Batch over "data" and heads over "tensor": each device runs the kernel
  # on one row and one kv-head group.
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    assert contract_error(attention_lib.backend("splash"), "sliding") < 2e-4


def _splash_step_on_a_mesh(attention: str, run: bool = True):
  """One SGD step (update = grad) of a 1-layer tiny Llama, data 2 x tensor 2,
  on packed rows of 128 tokens: (lowered text, (metrics, new params))."""
  cfg = config_lib.load_config("configs/tiny.py", [
      "--config.optim.name=sgd", "--config.optim.b1=0",
      "--config.optim.lr=1.0", "--config.optim.schedule=constant",
      "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0",
      "--config.optim.weight_decay=0", f"--config.model.attention={attention}",
      "--config.train.batch_size=4", "--config.train.seq_len=128",
      "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2"])
  cfg.model.hf_config = json.dumps(dict(json.loads(cfg.model.hf_config),
                                        num_hidden_layers=1))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  batch = sharding.global_batch(bench.synthetic_batch(
      4, 128, model_cfg.vocab_size, 0), mesh)
  train_step = step_lib.jit_train_step(
      cfg, model_cfg, mesh, shardings,
      compiler_options={"xla_backend_optimization_level": 0})
  text = train_step.lower(state, batch).as_text()
  if not run:
    return text, None
  state, metrics = train_step(state, batch)
  return text, jax.tree.map(np.asarray, (metrics, state.trainable))


def _shard_mapped(text: str) -> bool:
  # shard_map lowers to a manual computation (Shardy) or to GSPMD's
  # full-to-shard custom calls.
  return "sdy.manual_computation" in text or "SPMDFullToShardShape" in text


def test_train_step_runs_splash_per_shard_with_the_numbers_of_xla(
    monkeypatch):
  text, (metrics, params) = _splash_step_on_a_mesh("splash")
  # Queries enter the kernel split over batch ("data") and heads ("tensor").
  assert _shard_mapped(text)
  assert '[{"data", "fsdp"}, {"tensor"}, {}, {}]' in text or (
      "SPMDFullToShardShape" in text)
  _, (ref_metrics, ref_params) = _splash_step_on_a_mesh("xla")
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0,
                                 atol=1e-5), params, ref_params)
  # Traced without the mesh, splash would run vmapped, not per shard.
  monkeypatch.setattr(step_lib, "traced_mesh",
                      lambda mesh: contextlib.nullcontext())
  text, _ = _splash_step_on_a_mesh("splash", run=False)
  assert not _shard_mapped(text)


@pytest.mark.parametrize("kind", ["causal", "softcap_sliding"])
def test_backend_ignoring_segment_ids_fails_the_contract(kind):
  def packing_blind(q, k, v, qp, qs, kp, ks, **kw):
    return attention_lib.backend("xla")(q, k, v, qp, (qs != 0) * 1, kp,
                                        (ks != 0) * 1, **kw)
  assert contract_error(packing_blind, kind) > 1e-2


def test_train_mode_equals_cache_mode_on_packed_rows():
  q, k, v, pos, seg = packed_batch()
  for window, softcap in KINDS.values():
    outs = [attention_lib.attention(q, k, v, pos, seg, pos, seg,
                                    window=window, softcap=softcap,
                                    scale=0.3, mode=m)
            for m in ("train", "cache")]
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, outs[0], 0),
                               np.where(valid, outs[1], 0), atol=1e-6)


def test_chunked_skips_invisible_blocks():
  q, k, v, pos, seg = (x[:, :96] for x in packed_batch())

  def flops(impl, window):
    f = jax.jit(lambda q, k, v: attention_lib.attention(
        q, k, v, pos, seg, pos, seg, window=window, scale=1.0, impl=impl,
        mode="train"))
    return f.lower(q, k, v).compile().cost_analysis()["flops"]

  attention_chunked._CHUNK, old = 16, attention_chunked._CHUNK
  try:
    dense, causal = flops("xla", None), flops("xla_chunked", None)
    local = flops("xla_chunked", 8)
  finally:
    attention_chunked._CHUNK = old
  # 6 query blocks: causal sees 1+2+..+6 = 21 of 36 key blocks; window 8
  # sees at most 2 per query block (11 of 36).
  assert causal < 0.7 * dense
  assert local < 0.4 * dense
  assert attention_chunked.key_range(5, 16, 8, 96) == (73, 96)
  assert attention_chunked.key_range(5, 16, None, 96) == (0, 96)


def test_chunked_saves_each_operand_once(monkeypatch):
  """The backward keeps q, k, v and the output once, plus row statistics.

  Per-block VJPs kept every block's key prefix (1 + 2 + .. + 6 of 6 key
  blocks: 3.5 copies of k and of v) and its mask.
  """
  monkeypatch.setattr(attention_chunked, "_CHUNK", 16)
  q, k, v, pos, seg = (x[:, :96] for x in packed_batch())
  out, vjp = jax.vjp(lambda q, k, v: attention_lib.attention(
      q, k, v, pos, seg, pos, seg, scale=1.0, impl="xla_chunked",
      mode="train"), q, k, v)
  saved = sum(x.nbytes for x in jax.tree.leaves(vjp))
  operands = sum(x.nbytes for x in (q, k, v, out, pos, seg, pos, seg))
  row_stats = 2 * q.size // K * 4  # max and sum per query row and head
  assert saved <= operands + row_stats + 4096


@pytest.mark.parametrize("window", [None, 9])
def test_gpu_adapters_give_the_reference_mask(window):
  _, _, _, pos, seg = packed_batch()
  idx, _ = attention_lib.order(pos, pos, "train")
  want = attention_lib.attention_mask(idx, seg, idx, seg, window)
  real = (seg != 0)[:, :, None]
  starts = attention_gpu.segment_starts(seg, window)
  np.testing.assert_array_equal(
      attention_gpu.mask_from_starts(starts) & real, want)
  offsets, seqlens, count = attention_gpu.offsets_and_seqlens(seg, 4)
  np.testing.assert_array_equal(count, [3, 2])
  np.testing.assert_array_equal(offsets, [[0, 37, 66, -1, -1],
                                          [5, 63, -1, -1, -1]])
  np.testing.assert_array_equal(seqlens, [[37, 29, 21, -1], [58, 37, -1, -1]])
  np.testing.assert_array_equal(
      attention_gpu.mask_from_offsets(offsets, seqlens, _T, window), want)


@pytest.mark.parametrize("platform,softcap,want", [
    ("tpu", None, "splash"), ("tpu", 50.0, "splash"),
    ("cpu", None, "xla_chunked"), ("cpu", 50.0, "xla_chunked")])
def test_auto_resolves_by_platform(platform, softcap, want):
  assert attention_lib.resolve("auto", softcap=softcap,
                               platform=platform) == want
  # Kernels know index causality only: decoding runs an XLA path.
  assert attention_lib.resolve("auto", mode="cache",
                               platform=platform) == "xla"


def test_unknown_impl_and_mode_are_errors():
  q, k, v, pos, seg = packed_batch()
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention_lib.attention(q, k, v, pos, seg, pos, seg, scale=1.0,
                            impl="flash")
  with pytest.raises(ValueError, match="unknown attention mode"):
    attention_lib.attention(q, k, v, pos, seg, pos, seg, scale=1.0,
                            mode="prefill")



def test_chunked_cache_mode_equals_xla(monkeypatch):
  """Decoding: 5 new tokens against a 40-slot cache, causality by position."""
  monkeypatch.setattr(attention_chunked, "_CHUNK", 2)
  q, k, v, pos, seg = packed_batch()
  q, q_pos, q_seg = q[:, 30:35], pos[:, 30:35], seg[:, 30:35]
  k, v, kv_pos, kv_seg = k[:, :40], v[:, :40], pos[:, :40], seg[:, :40]
  for window, softcap in KINDS.values():
    outs = [attention_lib.attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg,
                                    window=window, softcap=softcap, scale=0.3,
                                    impl=impl, mode="cache")
            for impl in ("xla", "xla_chunked")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
