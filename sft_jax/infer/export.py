"""Export to Hugging Face: merged weights or a PEFT adapter, and back.

A merged export is a plain `transformers` checkpoint: config.json, sharded
safetensors, generation_config.json (stopping at the chat template's end of
turn as well as EOS) and the run's tokenizer files, byte for byte, so the
chat template is exactly the one training rendered.

An adapter export is what `peft` itself writes: adapter_config.json and
adapter_model.safetensors with tensors named
`base_model.model.<hf module>.lora_A.weight` [r, in] and `lora_B.weight`
[out, r], recording the base model's path or hub id. `load_peft_adapter`
reads such a directory (ours or one written by `peft`) back into a "lora"
variable collection.
"""

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import safetensors.numpy

from sft_jax import models
from sft_jax.infer import prompting

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GENERATION_CONFIG = "generation_config.json"

# Merged checkpoints are split into shards of at most this size.
DEFAULT_MAX_SHARD_SIZE = "5GB"

def _write_json(path: str, value: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def generation_config(tokenizer, base: dict[str, Any] | None = None):
  """generation_config.json contents for a fine-tuned chat model.

  Starts from the base model's generation config (when given) and makes
  `eos_token_id` list both EOS and the chat template's end-of-turn id, so
  `model.generate` stops where our training data ended assistant turns.
  """
  out = dict(base or {})
  extra = out.get("eos_token_id")
  extra = [] if extra is None else (
      list(extra) if isinstance(extra, (list, tuple)) else [extra])
  out["eos_token_id"] = prompting.stop_ids(tokenizer, extra)
  for key in ("bos_token_id", "pad_token_id"):
    value = getattr(tokenizer, key)
    if value is not None and key not in out:
      out[key] = int(value)
  return out


def base_generation_config(base_model: str | None) -> dict[str, Any] | None:
  """The base model's generation_config.json as a dict, when it has one.

  `base_model` is a local directory or a hub id (resolved like the weights:
  the hub cache, else a download); a base without the file gives None.
  """
  if not base_model:
    return None
  path = os.path.join(models.resolve(base_model), GENERATION_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_tokenizer(out_dir: str, tokenizer, tokenizer_files) -> None:
  if tokenizer_files:
    for name, content in tokenizer_files.items():
      if os.path.basename(name) != name:
        raise ValueError(f"tokenizer file name {name!r} is not a plain name")
      with open(os.path.join(out_dir, name), "wb") as f:
        f.write(content)
  else:
    tokenizer.save_pretrained(out_dir)


def export_merged(model_cfg, params, lora, out_dir: str, *, tokenizer,
                  tokenizer_files: dict[str, bytes] | None = None,
                  base_model: str | None = None, dtype: str | None = None,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> str:
  """Writes a standalone transformers checkpoint with LoRA folded in.

  Args:
    model_cfg: models.ModelConfig (its `lora` says how `lora` scales).
    params: the base (or fully fine-tuned) params.
    lora: the "lora" collection, or None for a full fine-tune.
    out_dir: created if needed; existing files of the same names replaced.
    tokenizer: the run's tokenizer (for generation_config.json).
    tokenizer_files: the run's tokenizer files (name -> bytes), copied
      verbatim; None writes `tokenizer.save_pretrained` instead.
    base_model: the base model's path or hub id, for its generation config.
    dtype: weight dtype on disk ("float32", "bfloat16", "float16"); None
      keeps the params' dtype.
    max_shard_size: safetensors shard limit, e.g. "5GB" or bytes.

  Returns:
    out_dir.
  """
  if model_cfg.quant:  # qlora: the dequantized base, LoRA merged into it.
    params = models.dequantize_params(params)
    model_cfg = dataclasses.replace(model_cfg, quant="")
  if lora is not None:
    if model_cfg.lora is None:
      raise ValueError("got LoRA variables but model_cfg.lora is None")
    params = models.merge_lora(params, lora, model_cfg)
  merged_cfg = dataclasses.replace(model_cfg, lora=None)
  os.makedirs(out_dir, exist_ok=True)
  models.save_hf(merged_cfg, params, out_dir, dtype=dtype,
                 max_shard_size=max_shard_size)
  _write_json(os.path.join(out_dir, GENERATION_CONFIG),
              generation_config(tokenizer, base_generation_config(base_model)))
  _write_tokenizer(out_dir, tokenizer, tokenizer_files)
  return out_dir


def export_adapter(model_cfg, lora, out_dir: str, *, base_model: str,
                   dtype: str | None = None,
                   tokenizer=None,
                   tokenizer_files: dict[str, bytes] | None = None) -> str:
  """Writes a PEFT LoRA adapter that `peft` loads over `base_model`.

  Args:
    model_cfg: models.ModelConfig with `lora` set.
    lora: the "lora" variable collection.
    out_dir: created if needed.
    base_model: the base model's path or hub id, recorded in
      adapter_config.json as base_model_name_or_path.
    dtype: adapter dtype on disk; None keeps the variables' dtype.
    tokenizer, tokenizer_files: when given, the tokenizer is written beside
      the adapter (verbatim files preferred), as `peft` users expect when the
      chat template differs from the base model's.

  Returns:
    out_dir.
  """
  if model_cfg.lora is None or lora is None:
    raise ValueError("an adapter export needs a LoRA run (model_cfg.lora and "
                     "the lora variables); use a merged export otherwise")
  tensors = models.peft_tensors(lora, model_cfg)
  if not tensors:
    raise ValueError(f"LoRA targets {model_cfg.lora.targets!r} matched no "
                     "module: the adapter would be empty")
  if dtype is not None:
    tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
  adapter_config = models.peft_config(lora, model_cfg, base_model)
  # Explicit values for the settings peft would otherwise default, so the
  # file reads the same under any peft version.
  adapter_config.update(init_lora_weights=True, modules_to_save=None,
                        use_dora=False, rank_pattern={}, alpha_pattern={})
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS),
                              metadata={"format": "pt"})
  _write_json(os.path.join(out_dir, ADAPTER_CONFIG), adapter_config)
  if tokenizer is not None or tokenizer_files:
    _write_tokenizer(out_dir, tokenizer, tokenizer_files)
  return out_dir


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
  """adapter_config.json, checked to be a plain LoRA adapter we can load."""
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} a "
                            "PEFT adapter directory?)")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  unsupported = {
      "peft_type": config.get("peft_type", "LORA") != "LORA",
      "use_dora": bool(config.get("use_dora")),
      "rank_pattern": bool(config.get("rank_pattern")),
      "alpha_pattern": bool(config.get("alpha_pattern")),
      "modules_to_save": bool(config.get("modules_to_save")),
      "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
      "bias": config.get("bias", "none") != "none",
      "lora_bias": bool(config.get("lora_bias")),
      "layers_to_transform": config.get("layers_to_transform") is not None,
      "exclude_modules": bool(config.get("exclude_modules")),
      "trainable_token_indices": bool(config.get("trainable_token_indices")),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(f"{path}: unsupported adapter settings "
                     f"{ {k: config.get(k) for k in bad} }; only plain LoRA "
                     "(one rank and alpha, no DoRA, no extra saved modules) "
                     "can be imported")
  return config


def lora_config_from_peft(adapter_dir: str, targets: str | None = None):
  """A models.LoraConfig equivalent to a PEFT adapter's config.

  Args:
    adapter_dir: the adapter directory.
    targets: the regex over module names; None derives it from the
      adapter's target_modules (a list of module names, or a regex string).
  """
  config = read_adapter_config(adapter_dir)
  if targets is None:
    target_modules = config["target_modules"]
    if isinstance(target_modules, str):
      targets = target_modules
    else:
      targets = "|".join(re.escape(m) for m in sorted(target_modules))
  return models.LoraConfig(rank=int(config["r"]),
                           alpha=float(config["lora_alpha"]),
                           rslora=bool(config.get("use_rslora", False)),
                           targets=targets)


def load_peft_adapter(adapter_dir: str, model_cfg):
  """Reads a PEFT LoRA adapter into a "lora" variable collection.

  Args:
    adapter_dir: holds adapter_config.json and adapter_model.safetensors.
    model_cfg: the model's config; its `lora` must have the adapter's rank,
      alpha and rsLoRA setting (build it with `lora_config_from_peft`).

  Returns:
    The lora pytree for `model.apply({"params": p, "lora": lora}, ...)`.
  """
  config = read_adapter_config(adapter_dir)
  lcfg = model_cfg.lora
  if lcfg is None:
    raise ValueError("model_cfg.lora is None: set it with "
                     f"lora_config_from_peft({adapter_dir!r})")
  want = (int(config["r"]), float(config["lora_alpha"]),
          bool(config.get("use_rslora", False)))
  have = (int(lcfg.rank), float(lcfg.alpha), bool(lcfg.rslora))
  if want != have:
    raise ValueError(f"{adapter_dir}: adapter (rank, alpha, rslora) = {want}"
                     f" but model_cfg.lora has {have}")
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing adapter weights (only "
                            "safetensors adapters are supported)")
  tensors = safetensors.numpy.load_file(path)
  # peft inserts the adapter name (".default") on load but not on save;
  # accept either spelling.
  tensors = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k)
             : v for k, v in tensors.items()}
  shapes = jax.eval_shape(
      lambda: models.init(model_cfg, jax.random.key(0))["lora"])
  return models.lora_from_peft(tensors, model_cfg, shapes, source=path)
