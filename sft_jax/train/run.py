"""Reading a trained run back for generation, evaluation and export.

  run = load_run("runs/tiny")            # latest checkpoint
  logits = models.Transformer(run.model_cfg).apply(
      {"params": run.params, **({"lora": run.lora} if run.lora else {})}, ...)

The config and tokenizer come from the checkpoint itself, so they are exactly
what that step was trained with. Checkpoints hold only what training changed:
under LoRA or `freeze` the frozen weights are read again from the base model
(`run.base_model`, or re-created from the seed for a randomly initialised
model); the optimizer state is never read.
"""

import dataclasses
import os
import tempfile
from typing import Any

import jax
from ml_collections import config_dict

from sft_jax import data
from sft_jax import errors
from sft_jax.train import checkpoint as checkpoint_lib
from sft_jax.train import config as config_lib
from sft_jax.train import freeze
from sft_jax.train import partition
from sft_jax.train import sharding
from sft_jax.train import model_setup
from sft_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
  """A checkpoint of a run, ready for inference.

  Attributes:
    config: the resolved training config (locked ConfigDict).
    model_cfg: models.ModelConfig (with `lora` set under method lora).
    params: the model's "params" collection (trained, or base under LoRA).
    lora: the "lora" collection, or None.
    tokenizer: the tokenizer, with the exact chat template of the run.
    step: the checkpoint's step.
    base_model: `model.path` of the config (HF dir or hub id); None when the
      model was randomly initialised.
    tokenizer_files: the tokenizer files verbatim (name -> bytes).
  """
  config: config_dict.ConfigDict
  model_cfg: Any
  params: dict
  lora: dict | None
  tokenizer: Any
  step: int
  base_model: str | None
  tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)


def checkpoint_steps(run_dir: str) -> list[int]:
  """The steps of the complete checkpoints of `run_dir`, ascending."""
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.WorkdirError(f"{run_dir}: not a run directory (no "
                              "checkpoints/ folder); give a --workdir of "
                              "`sft-jax train`")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def load_run(run_dir: str, step: int | None = None, *,
             mesh: jax.sharding.Mesh | None = None) -> Run:
  """Loads checkpoint `step` (default: the latest) of the run in `run_dir`.

  Args:
    run_dir: a directory written by `sft-jax train --workdir`.
    step: a checkpoint step; None for the latest.
    mesh: where to place the weights; default: every device on the "fsdp"
      axis (weights sharded, no replicated copy).
  """
  directory = os.path.join(run_dir, "checkpoints")
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise errors.WorkdirError(
        f"{directory}: no complete checkpoint yet; train first (a run saves "
        "every checkpoint.every_steps and at its end)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise errors.WorkdirError(f"{directory}: no checkpoint of step {step}; "
                              f"have {steps} (--step)")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    cfg = config_lib.config_from_dict(ckpt.restore_config(step))
    tokenizer_files = ckpt.restore_tokenizer_files(step)
    with tempfile.TemporaryDirectory() as tmp:
      for name, content in tokenizer_files.items():
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(content)
      tokenizer = data.load_tokenizer(tmp)

    if mesh is None:
      mesh = sharding.make_mesh(config_dict.ConfigDict(
          dict(data=1, fsdp=-1, tensor=1)))
    model_cfg = model_setup.model_config(cfg)
    shapes, shardings = model_setup.variable_shardings(cfg, model_cfg, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes, shardings)
    trainable_abstract, frozen_abstract = step_lib.split_trainable(cfg,
                                                                   abstract)
    restored = ckpt.restore_state_subset(step, {
        "step": jax.ShapeDtypeStruct((), jax.numpy.int32,
                                     sharding=sharding.replicated(mesh)),
        "trainable": trainable_abstract})
  finally:
    ckpt.close()

  frozen = {}
  if jax.tree.leaves(frozen_abstract):
    _, variables = model_setup.load_or_init_model(cfg, mesh)
    _, frozen = step_lib.split_trainable(cfg, variables)
    del variables
  variables = freeze.join_layers(partition.merge(restored["trainable"],
                                                 frozen))
  return Run(config=cfg, model_cfg=model_cfg, params=variables["params"],
             lora=variables.get("lora"), tokenizer=tokenizer,
             step=int(restored["step"]), base_model=cfg.model.path or None,
             tokenizer_files=tokenizer_files)
