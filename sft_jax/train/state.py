"""The train state: what is trained, what is frozen, and the optimizer.

  state, state_shardings = init_train_state(cfg, model_cfg, variables, mesh)

`split_trainable` partitions the model variables by the method (full, LoRA,
freeze) into the differentiated `trainable` part and the `frozen` rest;
`make_optimizer` builds the Optax chain over `trainable` only, so frozen
weights carry no optimizer state. The steps that update a state are in
step.py.
"""

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from sft_jax import models
from sft_jax.train import freeze
from sft_jax.train import model_setup
from sft_jax.train import optim
from sft_jax.train import partition
from sft_jax.train import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  trainable / frozen are disjoint parts of the model variables, each a dict
  of collections ({"params": ...} and/or {"lora": ...}); merging them gives
  the variables for `model.apply`. Only `trainable` is differentiated and
  only it has optimizer state.
  """
  step: jax.Array  # int32 scalar: optimizer updates done.
  trainable: dict
  frozen: dict
  opt_state: Any


def variables_of(state: TrainState) -> dict:
  """The model variables {"params": ..., ["lora": ...]} of a state, with
  every stacked leaf whole ([L, ...]; see freeze.py)."""
  variables = partition.merge(state.trainable, state.frozen)
  variables.pop("teacher", None)  # A distillation teacher's own weights.
  return freeze.join_layers(variables)


def training_model_config(state_or_frozen, model_cfg: "models.ModelConfig"
                          ) -> "models.ModelConfig":
  """model_cfg running the state's bottom layers as frozen (freeze.py)."""
  frozen = getattr(state_or_frozen, "frozen", state_or_frozen)
  bottom = frozen.get("params", {}).get(freeze.FROZEN_LAYERS)
  if bottom is None:
    return model_cfg
  return dataclasses.replace(
      model_cfg, frozen_layers=jax.tree.leaves(bottom)[0].shape[0])


# --- trainable / frozen ----------------------------------------------------

TRAINABLE_DTYPES = ("float32", "bfloat16")  # config model.trainable_dtype


def trainable_dtype(cfg: config_dict.ConfigDict) -> jnp.dtype:
  """Storage dtype of the trainable weights, their gradients and optimizer state.

  float32 whatever `model.param_dtype` is: a bf16 weight cannot take an update
  below half its ulp (|w| * 2^-9), which at fine-tuning learning rates is most
  updates. The float32 copy in the state IS the master copy: the model casts
  every weight to the compute dtype where it is used, so no second bf16 copy
  is kept. Chosen over stochastic rounding or compensated (Kahan) summation:
  exact and deterministic (a resumed run is bit-identical), and bf16 + a bf16
  compensation term costs the same 4 bytes per weight. "bfloat16" (pure bf16)
  is an explicit opt-in.
  """
  name = cfg.model.trainable_dtype
  if name not in TRAINABLE_DTYPES:
    raise ValueError(f"config model.trainable_dtype: unknown {name!r} "
                     f"({' | '.join(TRAINABLE_DTYPES)})")
  return jnp.dtype(name)


def _cast_floating(tree: dict, dtype) -> dict:
  """Floating leaves (arrays or ShapeDtypeStructs) cast to `dtype`."""
  def fn(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    # Explicitly into the same shards: never a replicated copy.
    return jax.jit(lambda a: a.astype(dtype), out_shardings=x.sharding)(x)
  return jax.tree.map(fn, tree)


def split_trainable(cfg: config_dict.ConfigDict, variables: dict
                    ) -> tuple[dict, dict]:
  """(trainable, frozen) parts of `variables` by `cfg.method`.

  The trainable part is cast to `trainable_dtype(cfg)` (float32 by default,
  also for LoRA adapters over a bf16 base); the frozen part keeps its dtype.
  `variables` may hold arrays or jax.ShapeDtypeStructs.
  """
  trainable, frozen = _split_by_method(cfg, variables)
  return _cast_floating(trainable, trainable_dtype(cfg)), frozen


def _split_by_method(cfg: config_dict.ConfigDict, variables: dict
                     ) -> tuple[dict, dict]:
  name = cfg.method.name
  params = {"params": variables["params"]}
  if name == "full":
    return params, {k: v for k, v in variables.items() if k != "params"}
  if name in ("lora", "qlora"):
    if "lora" not in variables:
      raise ValueError(f"method {name}: the variables have no 'lora' "
                       "collection")
    return {"lora": variables["lora"]}, params
  if name == "freeze":
    hit, rest = partition.split(variables["params"], cfg.method.trainable)
    if not hit:
      raise ValueError(f"config method.trainable={cfg.method.trainable!r} "
                       "matches no parameter; paths look like "
                       f"{sorted(partition.flat(variables['params']))[:3]}")
    f = freeze.num_frozen_layers(cfg.method.train_top_layers,
                                 variables["params"])
    hit, rest = freeze.split_layers(hit, rest, f)
    return {"params": hit}, {"params": rest}
  raise ValueError(f"config method.name: unknown {name!r} "
                   f"({' | '.join(model_setup.METHODS)})")


def _wd_mask_fn(exclude: str) -> Callable[[dict], dict]:
  # Paths are matched inside their collection ("layers/...", not
  # "params/layers/..."), like method.trainable.
  def fn(trainable):
    return {coll: optim.weight_decay_mask(tree, exclude)
            for coll, tree in trainable.items()}
  return fn


def lr_schedule(cfg: config_dict.ConfigDict) -> optax.Schedule:
  """The run's learning rate by optimizer step (see optim.schedule_* keys)."""
  return optim.schedule(cfg.optim, cfg.optim.schedule_steps or cfg.train.steps,
                        start=cfg.optim.schedule_start)


def make_optimizer(cfg: config_dict.ConfigDict) -> optax.GradientTransformation:
  return optim.make_optimizer(cfg.optim, None,
                              _wd_mask_fn(cfg.optim.wd_exclude),
                              lr=lr_schedule(cfg))


def init_train_state(cfg: config_dict.ConfigDict,
                     model_cfg: "models.ModelConfig", variables: dict,
                     mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """(state, state_shardings): optimizer state only for the trainable part.

  Optimizer state leaves shaped like a parameter take that parameter's
  sharding; the rest (counts, factored statistics) are replicated.
  """
  del model_cfg
  trainable, frozen = split_trainable(cfg, variables)
  if "teacher" in variables:  # Distillation teacher: frozen whatever method.
    frozen["teacher"] = variables["teacher"]
  tx = make_optimizer(cfg)
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  _, opt_shardings = _opt_shapes_and_shardings(tx, trainable, mesh)
  repl = sharding.replicated(mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl),
                     trainable=trainable, frozen=frozen, opt_state=opt_state)
  shardings = TrainState(step=repl, trainable=param_shardings,
                         frozen=jax.tree.map(lambda x: x.sharding, frozen),
                         opt_state=opt_shardings)
  return state, shardings


def _opt_shapes_and_shardings(tx, trainable, mesh):
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  opt_shapes = jax.eval_shape(tx.init, trainable)
  repl = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda s, ps, p: ps if s.shape == p.shape else repl,
      opt_shapes, param_shardings, trainable,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return opt_shapes, opt_shardings


def abstract_train_state(cfg: config_dict.ConfigDict, abstract_variables: dict,
                         mesh: jax.sharding.Mesh
                         ) -> tuple[TrainState, TrainState]:
  """`init_train_state` in ShapeDtypeStructs (with shardings): allocates
  nothing, for lowering the step ahead of time (`sft-jax plan`)."""
  trainable, frozen = split_trainable(cfg, abstract_variables)
  _, opt_shardings = _opt_shapes_and_shardings(make_optimizer(cfg), trainable,
                                               mesh)
  opt_shapes = jax.eval_shape(make_optimizer(cfg).init, trainable)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  repl = sharding.replicated(mesh)
  shardings = TrainState(
      step=repl, trainable=jax.tree.map(lambda x: x.sharding, trainable),
      frozen=jax.tree.map(lambda x: x.sharding, frozen),
      opt_state=opt_shardings)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
                     trainable=trainable, frozen=frozen,
                     opt_state=jax.tree.map(sds, opt_shapes, opt_shardings))
  return state, shardings


def param_report(cfg: config_dict.ConfigDict, model_cfg: "models.ModelConfig",
                 state: TrainState) -> dict[str, int]:
  """Counts for the start-of-run report: params and optimizer-state bytes."""
  del cfg, model_cfg
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  trainable = size(state.trainable)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  # A quantized kernel counts its weights, not its codes and scales.
  frozen = jax.eval_shape(models.dequantize_params, state.frozen)
  return {
      "trainable_params": trainable,
      "total_params": size(state.trainable) + size(frozen),
      "trainable_bytes": nbytes(state.trainable),
      "frozen_bytes": nbytes(state.frozen),
      "opt_state_bytes": nbytes(state.opt_state),
  }
