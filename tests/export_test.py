"""Export checked by transformers and peft themselves: the merged checkpoint
and the adapter give sft_jax's logits; adapters written by peft import
exactly; HF -> sft_jax -> HF is lossless for every family."""

import dataclasses
import json
import os

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import tiny_hf
import tiny_tok
from sft_jax import models
from sft_jax.infer import export

_TOKENS = np.array([[1, 5, 77, 120, 33, 2, 250, 9, 14],
                    [3, 8, 8, 299, 41, 60, 7, 0, 0]], np.int32)
_LORA = models.LoraConfig(
    rank=4, alpha=12.0, rslora=False,
    targets=r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")


def _ours(cfg, variables, tokens=_TOKENS):
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  segments = np.ones((b, t), np.int32)
  return np.asarray(models.Transformer(cfg).apply(
      variables, tokens, positions, segments))


def _theirs(hf_model, tokens=_TOKENS):
  with torch.no_grad():
    return hf_model(torch.from_numpy(tokens).long()).logits.numpy()


def _random_lora(cfg, seed):
  """LoRA variables with non-zero B, so the adapter changes the logits."""
  lora = models.init(cfg, jax.random.key(seed))["lora"]
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
  """(base HF dir, cfg with LoRA, params, lora, tokenizer)."""
  root = tmp_path_factory.mktemp("lora_model")
  base = tiny_hf.make_tiny_hf("qwen2", root / "base", vocab_size=300)
  cfg, params = models.load_hf(base)
  cfg = dataclasses.replace(cfg, lora=_LORA)
  tok = tiny_tok.make_tokenizer()
  return base, cfg, params, _random_lora(cfg, 0), tok


def test_merged_export_loads_in_transformers(lora_model, tmp_path):
  base, cfg, params, lora, tok = lora_model
  ours = _ours(cfg, {"params": params, "lora": lora})
  base_logits = _ours(dataclasses.replace(cfg, lora=None), {"params": params})
  assert np.abs(ours - base_logits).max() > 1e-2  # the LoRA matters
  out = str(tmp_path / "merged")
  export.export_merged(cfg, params, lora, out, tokenizer=tok,
                       base_model=base, max_shard_size="40KB")
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1  # sharded
  theirs = _theirs(tiny_hf.load_hf(out))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # The tokenizer and chat template travel with the weights; the generation
  # config stops at EOS and at the template's end of turn.
  loaded_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert loaded_tok.chat_template == tiny_tok.CHATML
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert sorted(gen.eos_token_id) == sorted(
      [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
  assert gen.pad_token_id == tok.pad_token_id


def test_adapter_export_loads_in_peft(lora_model, tmp_path):
  base, cfg, params, lora, tok = lora_model
  out = str(tmp_path / "adapter")
  export.export_adapter(cfg, lora, out, base_model=base, tokenizer=tok)
  config = json.load(open(os.path.join(out, "adapter_config.json")))
  assert config["base_model_name_or_path"] == base
  assert (config["r"], config["lora_alpha"]) == (4, 12.0)
  assert config["target_modules"] == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj"])
  # peft finds the base model from the recorded path on its own.
  peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  theirs = _theirs(peft_model)
  merged_dir = str(tmp_path / "merged")
  export.export_merged(cfg, params, lora, merged_dir, tokenizer=tok)
  merged = _theirs(tiny_hf.load_hf(merged_dir))
  np.testing.assert_allclose(theirs, merged, atol=1e-4, rtol=0)
  np.testing.assert_allclose(
      theirs, _ours(cfg, {"params": params, "lora": lora}), atol=1e-4,
      rtol=0)
  # And back: the adapter re-imports bit for bit.
  again = export.load_peft_adapter(out, cfg)
  jax.tree.map(np.testing.assert_array_equal, again, lora)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_written_by_peft_imports(lora_model, tmp_path, rslora):
  base, cfg, params, _, _ = lora_model
  hf_model = tiny_hf.load_hf(base)
  peft_cfg = peft.LoraConfig(
      r=8, lora_alpha=4, use_rslora=rslora, init_lora_weights=False,
      target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(hf_model, peft_cfg).eval()
  theirs = _theirs(peft_model)
  out = str(tmp_path / "peft_adapter")
  peft_model.save_pretrained(out)
  lora_cfg = export.lora_config_from_peft(out)
  assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.rslora) == (8, 4.0, rslora)
  cfg = dataclasses.replace(cfg, lora=lora_cfg)
  lora = export.load_peft_adapter(out, cfg)
  assert set(lora["layers"]["attn"]) == {"q_proj", "v_proj"}
  ours = _ours(cfg, {"params": params, "lora": lora})
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs - _theirs(tiny_hf.load_hf(base))).max() > 1e-2


def test_adapter_import_rejects_mismatch(lora_model, tmp_path):
  base, cfg, _, lora, _ = lora_model
  out = str(tmp_path / "adapter")
  export.export_adapter(cfg, lora, out, base_model=base)
  with pytest.raises(ValueError, match="rank, alpha, rslora"):
    export.load_peft_adapter(
        out, dataclasses.replace(cfg, lora=dataclasses.replace(_LORA,
                                                               rank=2)))
  config = json.load(open(os.path.join(out, "adapter_config.json")))
  config["use_dora"] = True
  json.dump(config, open(os.path.join(out, "adapter_config.json"), "w"))
  with pytest.raises(ValueError, match="use_dora"):
    export.load_peft_adapter(out, cfg)


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_hf_roundtrip_is_lossless(family, tmp_path):
  dtype = "bfloat16" if family == "gemma2" else "float32"
  src = tiny_hf.make_tiny_hf(family, tmp_path / "src", dtype=dtype)
  cfg, params = models.load_hf(src, dtype=dtype)
  out = str(tmp_path / "out")
  export.export_merged(cfg, params, None, out,
                       tokenizer=tiny_tok.make_tokenizer())
  a = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  if cfg.tie_embeddings:
    a.pop("lm_head.weight", None)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  src_cfg = transformers.AutoConfig.from_pretrained(src).to_dict()
  out_cfg = transformers.AutoConfig.from_pretrained(out).to_dict()
  ignore = {"transformers_version", "_name_or_path"}
  if src_cfg.get("layer_types"):
    # Spelled out per layer in the export, so the pattern is redundant.
    assert out_cfg["layer_types"] == src_cfg["layer_types"]
    ignore |= {"sliding_window_pattern", "_sliding_window_pattern"}
  # Every key of the source reads back the same; keys transformers fills in
  # by default may be spelled out in the export.
  assert {k: out_cfg.get(k) for k in src_cfg if k not in ignore} == {
      k: v for k, v in src_cfg.items() if k not in ignore}
