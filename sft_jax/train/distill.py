"""Teachers for distillation: the `distill` config section made runnable.

  objective = distill.objective(cfg)             # None when distillation is off
  teacher_cfg = distill.teacher_model_config(cfg)  # online teacher only
  variables["teacher"] = distill.load_teacher(cfg, mesh)  # frozen, in shards

Online (distill.teacher set, distill.cache ""): a second HF checkpoint with
the student's vocabulary, loaded frozen into its own shards (in
distill.teacher_dtype) and run inside the same jitted step. Its weights ride
in the train state's frozen part under "teacher" (never checkpointed: they
are re-read from distill.teacher on resume).

Offline (distill.cache set): the teacher's top-k log-probs per position,
written once by `sft-jax distill-cache` and read back with every batch as
`teacher_ids` / `teacher_logp` [B, T, K] (see sft_jax/data/teacher_cache.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from sft_jax import models
from sft_jax.train import config as config_lib
from sft_jax.train import distill_loss
from sft_jax.train import model_setup


class DistillConfigError(config_lib.ConfigError):
  """The distill section does not fit the run (named key and reason)."""


def enabled(cfg: config_dict.ConfigDict) -> bool:
  return bool(cfg.distill.teacher or cfg.distill.cache)


def is_offline(cfg: config_dict.ConfigDict) -> bool:
  return bool(cfg.distill.cache)


def objective(cfg: config_dict.ConfigDict) -> distill_loss.Objective | None:
  """The loss settings, or None when distillation is off."""
  if not enabled(cfg):
    return None
  d = cfg.distill
  top_k = d.top_k
  if is_offline(cfg):
    from sft_jax.data import teacher_cache  # pylint: disable=g-import-not-at-top
    top_k = teacher_cache.read_meta(d.cache)["top_k"]
  return distill_loss.Objective(alpha=d.alpha, temperature=d.temperature,
                                top_k=top_k, divergence=d.divergence)


def check_config(cfg: config_dict.ConfigDict) -> None:
  """Raises DistillConfigError naming the key when `distill` cannot work.

  Reads only small files (the teacher's config.json, the cache's meta.json),
  so it runs before anything is loaded.
  """
  if not enabled(cfg):
    return
  d = cfg.distill
  if d.divergence not in distill_loss.DIVERGENCES:
    raise DistillConfigError(
        f"config distill.divergence: unknown {d.divergence!r} "
        f"({' | '.join(distill_loss.DIVERGENCES)})")
  if not 0.0 <= d.alpha <= 1.0:
    raise DistillConfigError(f"config distill.alpha={d.alpha}: must be in "
                             "[0, 1]")
  if d.temperature <= 0:
    raise DistillConfigError(f"config distill.temperature={d.temperature}: "
                             "must be > 0")
  if d.top_k < 0:
    raise DistillConfigError(f"config distill.top_k={d.top_k}: must be >= 0")
  if d.teacher_dtype not in ("float32", "bfloat16"):
    raise DistillConfigError(f"config distill.teacher_dtype: unknown "
                             f"{d.teacher_dtype!r} (float32 | bfloat16)")
  student_vocab = model_setup.model_config(cfg).vocab_size
  if is_offline(cfg):
    from sft_jax.data import teacher_cache  # pylint: disable=g-import-not-at-top
    try:
      meta = teacher_cache.read_meta(d.cache)
    except (OSError, ValueError) as e:
      raise DistillConfigError(f"config distill.cache={d.cache!r}: {e}") from None
    if meta["vocab_size"] != student_vocab:
      raise DistillConfigError(
          f"config distill.cache={d.cache!r}: teacher vocabulary "
          f"{meta['vocab_size']} != student vocabulary {student_vocab}")
    if meta["seq_len"] != cfg.train.seq_len:
      raise DistillConfigError(
          f"config distill.cache={d.cache!r} was built for train.seq_len="
          f"{meta['seq_len']}, not {cfg.train.seq_len}; rebuild it with "
          "`sft-jax distill-cache`")
    return
  try:
    teacher_vocab = teacher_model_config(cfg).vocab_size
  except (OSError, ValueError, KeyError) as e:
    raise DistillConfigError(
        f"config distill.teacher={d.teacher!r}: cannot read its config "
        f"({e})") from None
  if d.top_k > teacher_vocab:
    raise DistillConfigError(f"config distill.top_k={d.top_k} exceeds the "
                             f"vocabulary ({teacher_vocab})")
  if teacher_vocab != student_vocab:
    raise DistillConfigError(
        f"config distill.teacher={d.teacher!r}: teacher vocabulary "
        f"{teacher_vocab} != student vocabulary {student_vocab}; "
        "distillation needs the same tokenizer")


def teacher_model_config(cfg: config_dict.ConfigDict) -> "models.ModelConfig":
  """The teacher's ModelConfig (no LoRA, compute in distill.teacher_dtype)."""
  return _teacher_model_config(cfg.distill.teacher, cfg.distill.teacher_dtype,
                               cfg.model.attention)


@functools.lru_cache(maxsize=4)
def _teacher_model_config(path, dtype, attention):
  hf = model_setup._read_hf_config(path)  # pylint: disable=protected-access
  return dataclasses.replace(models.ModelConfig.from_hf_config(hf),
                             dtype=dtype, param_dtype=dtype,
                             attention_impl=attention, lora=None)


def load_teacher(cfg: config_dict.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> dict:
  """The online teacher's params, loaded straight into their shards."""
  teacher_cfg = teacher_model_config(cfg)
  _, shardings = model_setup.variable_shardings(cfg, teacher_cfg, mesh)
  _, params = models.load_hf(cfg.distill.teacher,
                             dtype=cfg.distill.teacher_dtype,
                             shardings=shardings["params"])
  return params


def micro_loss(cfg: config_dict.ConfigDict, obj: distill_loss.Objective,
               student: tuple, teacher_params: dict | None, batch: dict,
               weight_BxT: jax.Array, z_weight_BxT: jax.Array, chunk: int):
  """`distill_loss.weighted_distill` of a micro-batch, teacher run here.

  student: (hidden_BxTxD, w_DxV, logits_fn) of the student.
  """
  hidden_BxTxD, w_DxV, logits_fn = student
  if is_offline(cfg):
    teacher = {"ids": batch["teacher_ids"], "logp": batch["teacher_logp"]}
  else:
    if teacher_params is None:
      raise ValueError("online distillation: the train state has no teacher "
                       "weights (variables['teacher'] = distill.load_teacher"
                       "(cfg, mesh) before init_train_state)")
    teacher_cfg = teacher_model_config(cfg)
    params = jax.lax.stop_gradient(teacher_params)
    hidden_BxTxE = models.Transformer(teacher_cfg).apply(
        {"params": params}, batch["tokens"], batch["positions"],
        batch["segment_ids"], return_hidden=True)
    teacher = {"hidden": hidden_BxTxE,
               "w": models.unembedding(params, teacher_cfg),
               "logits_fn": lambda h, w: models.logits_from_hidden(
                   h, w, teacher_cfg)}
  return distill_loss.weighted_distill(obj, hidden_BxTxD, w_DxV,
                                       batch["targets"], weight_BxT,
                                       z_weight_BxT, logits_fn, chunk, teacher)


def total_loss_sum(obj: distill_loss.Objective | None,
                   sums: dict) -> jax.Array:
  """The un-normalised training loss from a step's sums (see masked_sums)."""
  if obj is None:
    return sums["nll_sum"] + sums["z_sum"]
  return (obj.alpha * sums["nll_sum"] + (1.0 - obj.alpha)
          * obj.temperature ** 2 * sums["div_sum"] + sums["z_sum"])


def div_sum(per_token: dict, loss_mask_BxT: jax.Array) -> jax.Array:
  return jnp.sum(jax.lax.stop_gradient(per_token["div"])
                 * loss_mask_BxT.astype(jnp.float32))
