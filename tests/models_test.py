"""sft_jax.models against transformers (PyTorch eager) on tiny random models.

Every family in tiny_hf.FAMILIES is built with transformers, saved with
save_pretrained (single file fp32, and sharded bf16), loaded by sft_jax and
compared number by number. Compiles are shared: one batch shape, jitted
functions cached per config.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from sft_jax import models
import tiny_hf

FAMILIES = tiny_hf.FAMILIES
_V = 97
_TOL = 1e-4
_LENGTHS = (7, 4, 9)  # the packed row; 4 padding tokens follow
_T = 24
_LORA = models.LoraConfig(rank=4, alpha=8.0)
# Tiny programs: XLA's backend optimisations cost more than they save here.
_JIT = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg):
  model = models.Transformer(cfg)
  return _JIT(lambda v, t, p, s: model.apply(v, t, p, s))


@functools.lru_cache(maxsize=None)
def _grad_fn(cfg):
  model = models.Transformer(cfg)

  def loss(params, tokens, positions, segment_ids):
    logits = model.apply({"params": params}, tokens, positions, segment_ids)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

  return _JIT(jax.value_and_grad(loss))


@functools.lru_cache(maxsize=None)
def _decode_fn(cfg):
  model = models.Transformer(cfg)
  return _JIT(lambda v, t, p, s, cache, i: model.apply(
      v, t, p, s, cache=cache, cache_index=i))


def _seq(seed, n):
  return np.random.RandomState(seed).randint(0, _V, (n,)).astype(np.int32)


def _batch():
  """[3, T]: two plain rows and a packed row of three segments + padding."""
  seqs = [_seq(10 + i, n) for i, n in enumerate(_LENGTHS)]
  pad = _T - sum(_LENGTHS)
  packed = np.concatenate(seqs + [np.zeros(pad, np.int32)])
  tokens = np.stack([_seq(0, _T), packed, _seq(1, _T)])
  arange = np.arange(_T, dtype=np.int32)
  packed_pos = np.concatenate([np.arange(n) for n in _LENGTHS]
                              + [np.zeros(pad, int)]).astype(np.int32)
  packed_seg = np.concatenate([np.full(n, i + 1) for i, n in
                               enumerate(_LENGTHS)]
                              + [np.zeros(pad, int)]).astype(np.int32)
  positions = np.stack([arange, packed_pos, arange])
  segment_ids = np.stack([np.ones(_T, np.int32), packed_seg,
                          np.ones(_T, np.int32)])
  return tokens, positions, segment_ids, seqs


def _forward(cfg, variables, batch=None):
  tokens, positions, segment_ids, _ = batch or _batch()
  return np.asarray(_forward_fn(cfg)(variables, tokens, positions,
                                     segment_ids))


def _perturb(tree, scale, seed=0):
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + scale * rng.normal(size=x.shape).astype(
          np.float32), tree)


def _torch_logits(hf_model, tokens_BxT):
  with torch.no_grad():
    x = torch.tensor(np.asarray(tokens_BxT), dtype=torch.long)
    return hf_model(x).logits.float().numpy()


@dataclasses.dataclass
class _Family:
  path: str  # fp32, single file
  sharded_bf16_path: str
  hf_model: torch.nn.Module
  cfg: models.ModelConfig
  params: dict
  ours: np.ndarray  # logits of _batch()
  ref: np.ndarray  # transformers' logits of the two plain rows


@pytest.fixture(scope="module")
def fams(tmp_path_factory):
  out = {}
  tokens = _batch()[0]
  for family in FAMILIES:
    path = str(tmp_path_factory.mktemp(family))
    tiny_hf.make_tiny_hf(family, path)
    sharded = str(tmp_path_factory.mktemp(family + "_bf16"))
    tiny_hf.make_tiny_hf(family, sharded, dtype="bfloat16",
                         max_shard_size="20KB", seed=1)
    hf_model = tiny_hf.load_hf(path)
    cfg, params = models.load_hf(path)
    out[family] = _Family(path, sharded, hf_model, cfg, params,
                          _forward(cfg, {"params": params}),
                          _torch_logits(hf_model, tokens[[0, 2]]))
  return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(fams, family):
  f = fams[family]
  assert np.abs(f.ref).max() > 2.0  # big enough that errors show
  np.testing.assert_allclose(f.ours[[0, 2]], f.ref, atol=_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_sequences_run_separately(fams, family):
  f = fams[family]
  assert np.all(np.isfinite(f.ours))  # padding rows too
  start = 0
  for seq in _batch()[3]:
    ref = _torch_logits(f.hf_model, seq[None])[0]
    np.testing.assert_allclose(f.ours[1, start:start + len(seq)], ref,
                               atol=_TOL, rtol=0)
    start += len(seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_bf16_checkpoint(fams, family):
  f = fams[family]
  files = os.listdir(f.sharded_bf16_path)
  assert "model.safetensors.index.json" in files
  assert sum(name.endswith(".safetensors") for name in files) > 1
  cfg, params = models.load_hf(f.sharded_bf16_path)
  assert cfg == f.cfg  # same compiled forward
  hf_model = tiny_hf.load_hf(f.sharded_bf16_path)  # bf16 values, fp32 math
  tokens = _batch()[0]
  ours = _forward(cfg, {"params": params})
  np.testing.assert_allclose(ours[[0, 2]],
                             _torch_logits(hf_model, tokens[[0, 2]]),
                             atol=_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_unrolled(fams, family):
  f = fams[family]
  cfg = dataclasses.replace(f.cfg, scan_layers=False)
  ours = _forward(cfg, {"params": f.params})
  np.testing.assert_allclose(ours, f.ours, atol=1e-5, rtol=0)


# Remat wraps the same block for every family; two differing blocks suffice
# (gradient compiles are the slowest part of this file).
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_remat_gives_same_loss_and_grads(fams, family):
  f = fams[family]
  tokens, positions, segment_ids, _ = _batch()
  results = []
  policy = "full" if family == "llama" else "dots_with_no_batch_dims_saveable"
  for remat in ("none", policy):
    cfg = dataclasses.replace(f.cfg, remat=remat)
    results.append(_grad_fn(cfg)(f.params, tokens, positions, segment_ids))
  (loss0, grads0), (loss1, grads1) = results
  np.testing.assert_allclose(loss0, loss1, atol=1e-6, rtol=0)
  grad_norm = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0))
  assert grad_norm > 1e-3
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5,
                                 rtol=0), grads1, grads0)


def test_unknown_remat_policy_is_an_error(fams):
  cfg = dataclasses.replace(fams["llama"].cfg, remat="dots")
  with pytest.raises(ValueError, match="unknown remat policy 'dots'"):
    jax.eval_shape(functools.partial(models.init, cfg), jax.random.key(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(fams, family):
  """Prefill two prompts of different lengths (the shorter one padded),
  then decode one token per step; every logit matches transformers."""
  f = fams[family]
  full = [_seq(20, 12), _seq(21, 10)]
  prompt_len = (6, 4)
  prefill = 6
  tokens = np.zeros((2, prefill), np.int32)
  positions = np.zeros((2, prefill), np.int32)
  segment_ids = np.zeros((2, prefill), np.int32)
  for row, n in enumerate(prompt_len):
    tokens[row, :n] = full[row][:n]
    positions[row, :n] = np.arange(n)
    segment_ids[row, :n] = 1
  variables = {"params": f.params}
  decode = _decode_fn(f.cfg)
  cache = models.init_cache(f.cfg, 2, 16)
  logits, cache = decode(variables, tokens, positions, segment_ids, cache, 0)
  got = [[np.asarray(logits[row, :n])] for row, n in enumerate(prompt_len)]
  for step in range(6):
    idx = prefill + step
    tok = np.zeros((2, 1), np.int32)
    pos = np.zeros((2, 1), np.int32)
    for row, n in enumerate(prompt_len):
      tok[row, 0], pos[row, 0] = full[row][n + step], n + step
    logits, cache = decode(variables, tok, pos, np.ones_like(tok), cache, idx)
    for row in range(2):
      got[row].append(np.asarray(logits[row]))
  for row, n in enumerate(prompt_len):
    ours = np.concatenate(got[row])
    ref = _torch_logits(f.hf_model, full[row][None, :n + 6])[0]
    np.testing.assert_allclose(ours, ref, atol=_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip(fams, family, tmp_path):
  f = fams[family]
  tokens = _batch()[0][[0, 2]]
  # fp32, one file: lossless.
  models.save_hf(f.cfg, f.params, str(tmp_path / "f32"))
  reloaded = tiny_hf.load_hf(tmp_path / "f32")
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), f.ref,
                             atol=1e-5, rtol=0)
  cfg, params = models.load_hf(str(tmp_path / "f32"))
  assert cfg == f.cfg
  jax.tree.map(np.testing.assert_array_equal, params, f.params)
  # bf16, sharded: transformers reads what sft_jax reads. The directory
  # first holds another save, whose files must not linger.
  models.save_hf(f.cfg, f.params, str(tmp_path / "bf16"))
  names = models.save_hf(f.cfg, f.params, str(tmp_path / "bf16"),
                         dtype="bfloat16", max_shard_size="30KB")
  assert sorted(names + ["config.json", "model.safetensors.index.json"]) == (
      sorted(os.listdir(tmp_path / "bf16")))
  assert len(names) > 1
  cfg, params = models.load_hf(str(tmp_path / "bf16"))
  hf_model = tiny_hf.load_hf(tmp_path / "bf16")
  np.testing.assert_allclose(_forward(cfg, {"params": params})[[0, 2]],
                             _torch_logits(hf_model, tokens), atol=_TOL,
                             rtol=0)


# LoRA sits in the shared projection layer; these cover biases (llama,
# qwen2) and gemma's sandwich norms and soft-caps.
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_lora_zero_b_is_base_and_merge_equals_apply(fams, family):
  f = fams[family]
  cfg = dataclasses.replace(f.cfg, lora=_LORA)
  shapes = jax.eval_shape(functools.partial(models.init_lora, cfg),
                          jax.random.key(0))
  lora = _perturb(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes),
                  0.3)
  for module in models.lora_modules(lora).values():
    module["b"] = np.zeros_like(module["b"])
  assert set(models.lora_modules(lora)) == {
      "layers/attn/q_proj", "layers/attn/k_proj", "layers/attn/v_proj",
      "layers/attn/o_proj", "layers/mlp/gate_proj", "layers/mlp/up_proj",
      "layers/mlp/down_proj"}
  zero_b = _forward(cfg, {"params": f.params, "lora": lora})
  np.testing.assert_array_equal(zero_b, f.ours)
  lora = _perturb(lora, 0.05)
  adapted = _forward(cfg, {"params": f.params, "lora": lora})
  assert np.abs(adapted - f.ours).max() > 0.1
  merged = models.merge_lora(f.params, lora, cfg)
  np.testing.assert_allclose(_forward(f.cfg, {"params": merged}), adapted,
                             atol=_TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_peft_tensors_reproduce_our_lora_in_peft(fams, family):
  f = fams[family]
  cfg = dataclasses.replace(f.cfg, lora=_LORA)
  shapes = jax.eval_shape(functools.partial(models.init_lora, cfg),
                          jax.random.key(0))
  lora = _perturb(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes),
                  0.1)
  tensors = models.peft_tensors(lora, cfg)
  adapter = models.peft_config(lora, cfg)
  model = peft.get_peft_model(
      tiny_hf.load_hf(f.path),
      peft.LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"],
                      target_modules=adapter["target_modules"],
                      lora_dropout=0.0))
  result = peft.set_peft_model_state_dict(
      model, {k: torch.tensor(v) for k, v in tensors.items()})
  assert not result.unexpected_keys
  tokens = _batch()[0][[0, 2]]
  ours = _forward(cfg, {"params": f.params, "lora": lora})[[0, 2]]
  np.testing.assert_allclose(ours, _torch_logits(model.eval(), tokens),
                             atol=_TOL, rtol=0)
  back = models.lora_from_peft(tensors, cfg, lora)
  jax.tree.map(np.testing.assert_array_equal, back, lora)


@pytest.mark.parametrize("family,overrides", [
    # Linear rope scaling on the global layers only.
    ("gemma3", dict(rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # Sliding window from layer 1 on.
    ("qwen2", dict(use_sliding_window=True, sliding_window=5,
                   max_window_layers=1, layer_types=None)),
    ("llama", dict(mlp_bias=True, head_dim=8)),
])
def test_config_variants_match_transformers(family, overrides, tmp_path):
  path = tiny_hf.make_tiny_hf(family, tmp_path / "m", **overrides)
  cfg, params = models.load_hf(path)
  tokens = _batch()[0][[0, 2]]
  ref = _torch_logits(tiny_hf.load_hf(path), tokens)
  ours = _forward(cfg, {"params": params})[[0, 2]]
  np.testing.assert_allclose(ours, ref, atol=_TOL, rtol=0)


@pytest.mark.parametrize("family,change", [
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma2", dict(layer_types=("full_attention",) * 3)),
    ("mistral", dict(sliding_window=None)),
    ("llama3", dict(rope=models.RopeConfig(theta=500000.0))),
    ("gemma3", dict(rope_local=None)),
    ("gemma", dict(embed_scale=False)),
    ("qwen3", dict(qk_norm=False)),
])
def test_each_feature_visibly_changes_logits(fams, family, change):
  """Guards the fixtures: dropping any feature breaks parity by far."""
  f = fams[family]
  params = f.params
  if change.get("qk_norm") is False:
    params = dict(params, layers=dict(params["layers"]))
    params["layers"]["attn"] = {k: v for k, v in
                                params["layers"]["attn"].items()
                                if not k.endswith("_norm")}
  ours = _forward(dataclasses.replace(f.cfg, **change), {"params": params})
  assert np.abs(ours[[0, 2]] - f.ref).max() > 100 * _TOL


def test_image_text_gemma3_loads_its_language_model(fams, tmp_path):
  path = tiny_hf.make_tiny_hf("gemma3_mm", tmp_path / "mm")
  cfg, params = models.load_hf(path)  # vision tower tensors are skipped
  assert cfg.hf_wrapper == "gemma3"
  assert dataclasses.replace(cfg, hf_wrapper="") == dataclasses.replace(
      fams["gemma3"].cfg, passthrough=cfg.passthrough)
  tokens = _batch()[0][[0, 2]]
  ref = _torch_logits(tiny_hf.load_hf(path), tokens)
  ours = _forward(cfg, {"params": params})[[0, 2]]
  np.testing.assert_allclose(ours, ref, atol=_TOL, rtol=0)
  models.save_hf(cfg, params, str(tmp_path / "text"))  # text-only model
  text_model = tiny_hf.load_hf(tmp_path / "text")
  assert type(text_model).__name__ == "Gemma3ForCausalLM"
  np.testing.assert_allclose(_torch_logits(text_model, tokens), ref,
                             atol=1e-5, rtol=0)


def test_load_into_shardings_reads_slices(fams):
  f = fams["gemma3"]
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
           "mlp": "tensor"}
  axes = models.logical_axes(f.cfg)["params"]
  shardings = jax.tree.map(
      lambda names: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*(rules.get(n) for n in names))),
      axes, is_leaf=lambda x: isinstance(x, tuple))
  _, params = models.load_hf(f.sharded_bf16_path, shardings=shardings)
  _, plain = models.load_hf(f.sharded_bf16_path)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding == shardings["layers"]["attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (4, 8, 32)
  jax.tree.map(np.testing.assert_array_equal, params, plain)


def test_dtype_option_casts_params(fams):
  f = fams["qwen2"]
  cfg, params = models.load_hf(f.sharded_bf16_path, dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  cfg = dataclasses.replace(cfg, dtype="bfloat16")
  logits = _forward(cfg, {"params": params})
  _, ref_params = models.load_hf(f.sharded_bf16_path)
  ref = _forward(f.cfg, {"params": ref_params})
  assert logits.dtype == np.float32
  # bf16 compute tracks fp32 to bf16 precision on logits of size ~5.
  assert np.abs(logits - ref).max() < 0.25


def test_init_and_logical_axes_cover_every_leaf(fams):
  cfg = dataclasses.replace(fams["gemma3"].cfg, lora=_LORA)
  variables = jax.jit(functools.partial(models.init, cfg))(jax.random.key(0))
  axes = models.logical_axes(cfg)
  assert set(variables) == set(axes) == {"params", "lora"}
  shapes = jax.tree.map(lambda x: x.shape, variables)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_axes) == len(flat_shapes)
  for names, shape in zip(flat_axes, flat_shapes):
    assert len(names) == len(shape)
  lora_q = variables["lora"]["layers"]["attn"]["q_proj"]
  assert lora_q["a"].shape == (4, 32, 4) and not lora_q["b"].any()
  assert axes["lora"]["layers"]["attn"]["q_proj"]["a"] == (
      "layers", "embed", "lora_rank")


def test_hf_module_names_for_peft():
  assert models.hf_module_name("layers/attn/q_proj", 3) == (
      "model.layers.3.self_attn.q_proj")
  assert models.hf_module_name("layers/mlp/down_proj", 0, "gemma2") == (
      "model.layers.0.mlp.down_proj")


def test_config_round_trips_through_hf_dict(fams):
  for f in fams.values():
    again = models.ModelConfig.from_hf_config(f.cfg.to_hf_config())
    assert again == f.cfg


def test_transformers4_config_spelling_reads_the_same(fams):
  """rope_theta/rope_scaling (4.x) == rope_parameters (5.x); gemma3's
  rope_local_base_freq and sliding_window_pattern without layer_types."""
  llama3 = fams["llama3"].cfg.to_hf_config()
  legacy = {k: v for k, v in llama3.items()
            if k not in ("rope_parameters", "layer_types")}
  legacy["rope_scaling"] = dict(llama3["rope_parameters"], type="llama3")
  del legacy["rope_scaling"]["rope_type"]
  assert models.ModelConfig.from_hf_config(legacy) == fams["llama3"].cfg
  gemma3 = fams["gemma3"].cfg
  legacy = {k: v for k, v in gemma3.to_hf_config().items()
            if k not in ("rope_parameters", "layer_types")}
  legacy.update(rope_theta=10000.0, rope_local_base_freq=100.0,
                sliding_window_pattern=2)
  assert models.ModelConfig.from_hf_config(legacy) == gemma3
  legacy.update(rope_scaling={"rope_type": "linear", "factor": 8.0})
  scaled = models.ModelConfig.from_hf_config(legacy)
  assert scaled.rope == models.RopeConfig(10000.0, "linear", 8.0)
  assert scaled.rope_local == gemma3.rope_local  # local layers unscaled
