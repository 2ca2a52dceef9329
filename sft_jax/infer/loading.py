"""Loading a model for inference from a run directory or a HF checkpoint.

A run directory (what `sft-jax train --workdir` writes) is recognised by its
`checkpoints/` folder; anything else is a Hugging Face model directory or hub
id. A PEFT adapter can be put over either.
"""

import dataclasses
import os
from typing import Any

from sft_jax import errors
from sft_jax import models
from sft_jax.infer import export
from sft_jax.infer import prompting


@dataclasses.dataclass
class Loaded:
  """A model ready for generation.

  Attributes:
    model_cfg: models.ModelConfig (lora set iff variables has "lora").
    variables: {"params": ..., optionally "lora": ...}.
    tokenizer: the tokenizer, chat template included.
    stop_ids: EOS, end-of-turn and generation_config.json EOS ids.
    step: the checkpoint step (None for a HF checkpoint).
    base_model: the base model's path or hub id.
    run_dir: the run directory, or None.
    tokenizer_files: the run's tokenizer files verbatim (None for HF).
    config: the run's resolved config (None for HF).
  """
  model_cfg: Any
  variables: dict[str, Any]
  tokenizer: Any
  stop_ids: list[int]
  step: int | None = None
  base_model: str | None = None
  run_dir: str | None = None
  tokenizer_files: dict[str, bytes] | None = None
  config: Any = None


def is_run_dir(path: str) -> bool:
  """True for a training run directory (it has a checkpoints/ folder)."""
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load(model: str, *, step: int | None = None, adapter: str | None = None,
         dtype: str | None = None, merge_lora: bool = False) -> Loaded:
  """Loads a run directory or a HF checkpoint (+ optional PEFT adapter).

  Args:
    model: a run directory, a HF model directory, or a hub id.
    step: the run's checkpoint step (None: the latest); runs only.
    adapter: a PEFT LoRA adapter directory to apply over `model`'s weights.
    dtype: compute dtype ("float32", "bfloat16"); None keeps the config's.
    merge_lora: fold LoRA into the params (faster decoding, same function).
  """
  if is_run_dir(model):
    from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
    run = run_lib.load_run(model, step=step)
    loaded = Loaded(
        model_cfg=run.model_cfg, variables={"params": run.params},
        tokenizer=run.tokenizer, stop_ids=[], step=run.step,
        base_model=run.base_model, run_dir=model, config=run.config,
        tokenizer_files=run.tokenizer_files or None)
    if run.lora is not None:
      loaded.variables["lora"] = run.lora
    extra = export.base_generation_config(run.base_model) or {}
  else:
    if step is not None:
      raise errors.UserError(f"{model}: --step applies to run directories; "
                             "this one has no checkpoints/ folder",
                             what="model")
    import transformers  # pylint: disable=g-import-not-at-top
    local = models.resolve(model)  # a hub id is downloaded once, here
    cfg, params = models.load_hf(local)
    loaded = Loaded(
        model_cfg=cfg, variables={"params": params},
        tokenizer=transformers.AutoTokenizer.from_pretrained(local),
        stop_ids=[], base_model=model)
    extra = export.base_generation_config(local) or {}
  if adapter is not None:
    if "lora" in loaded.variables:
      raise errors.UserError(f"{model}: already carries LoRA weights; "
                             "export it merged first to put another adapter "
                             "over it", what="model")
    cfg = dataclasses.replace(
        loaded.model_cfg, lora=export.lora_config_from_peft(adapter))
    loaded.variables["lora"] = export.load_peft_adapter(adapter, cfg)
    loaded.model_cfg = cfg
  if dtype is not None:
    loaded.model_cfg = dataclasses.replace(loaded.model_cfg, dtype=dtype)
  if merge_lora and "lora" in loaded.variables:
    if loaded.model_cfg.quant:  # qlora: merge into the dequantized base.
      loaded.variables["params"] = models.dequantize_params(
          loaded.variables["params"], loaded.model_cfg.param_dtype)
      loaded.model_cfg = dataclasses.replace(loaded.model_cfg, quant="")
    loaded.variables = {"params": models.merge_lora(
        loaded.variables["params"], loaded.variables["lora"],
        loaded.model_cfg)}
    loaded.model_cfg = dataclasses.replace(loaded.model_cfg, lora=None)
  eos = extra.get("eos_token_id")
  eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
  loaded.stop_ids = prompting.stop_ids(loaded.tokenizer, eos)
  return loaded
