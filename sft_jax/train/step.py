"""The pure train / eval steps (the train state itself: state.py).

  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, state_shardings = init_train_state(cfg, model_cfg, variables, mesh)
  train_step = jit_train_step(cfg, model_cfg, mesh, state_shardings)
  state, metrics = train_step(state, batch)      # batch: dict of [B, T]

`make_train_step` returns the pure `(state, batch) -> (state, metrics)`;
`jit_train_step` jits it once with explicit shardings and donates the state.

Loss normalisation: the masked next-token cross-entropy is summed over every
micro-batch and every data-parallel shard of the global batch and divided once
by the number of supervised tokens in the whole global batch, so gradient
accumulation and the mesh shape change nothing but rounding.
"""

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from sft_jax import models
from sft_jax.train import distill
from sft_jax.train import loss as loss_lib
from sft_jax.train import optim
from sft_jax.train import partition
from sft_jax.train import sharding

# The state lives in state.py; these names stay importable from here.
from sft_jax.train.state import (  # pylint: disable=unused-import
    TRAINABLE_DTYPES,
    TrainState,
    abstract_train_state,
    init_train_state,
    lr_schedule,
    make_optimizer,
    param_report,
    split_trainable,
    trainable_dtype,
    training_model_config,
    variables_of,
)

Batch = dict[str, jax.Array]



# --- steps -----------------------------------------------------------------

def _num_sources(cfg: config_dict.ConfigDict) -> int:
  return max(1, len(cfg.data.sources))


def _hidden_and_head(model_cfg, variables, batch, rngs=None):
  """Final hidden states [B, T, D], the unembedding [D, V], the logits fn."""
  model = models.Transformer(model_cfg)
  hidden_BxTxD = model.apply(variables, batch["tokens"], batch["positions"],
                             batch["segment_ids"], return_hidden=True,
                             rngs=rngs)
  w_DxV = models.unembedding(variables["params"], model_cfg)
  logits_fn = lambda h, w: models.logits_from_hidden(h, w, model_cfg)
  return hidden_BxTxD, w_DxV, logits_fn


def _source_id(batch):
  source_id = batch.get("source_id")
  return jnp.zeros_like(batch["targets"]) if source_id is None else source_id


def _train_loss(model_cfg, variables, batch, denom, chunk, num_sources,
                z_loss, cfg=None, objective=None, rngs=None):
  """(loss of this micro-batch / denom, un-normalised sums for metrics)."""
  variables = dict(variables)
  teacher_params = variables.pop("teacher", None)
  hidden_BxTxD, w_DxV, logits_fn = _hidden_and_head(model_cfg, variables,
                                                    batch, rngs)
  nll_weight_BxT = batch["loss_mask"].astype(jnp.float32) / denom
  if objective is None:
    loss, per_token = loss_lib.weighted_ce(
        hidden_BxTxD, w_DxV, batch["targets"], nll_weight_BxT,
        z_loss * nll_weight_BxT, logits_fn, chunk)
  else:
    loss, per_token = distill.micro_loss(
        cfg, objective, (hidden_BxTxD, w_DxV, logits_fn), teacher_params,
        batch, nll_weight_BxT, z_loss * nll_weight_BxT, chunk)
  sums = loss_lib.masked_sums(jax.lax.stop_gradient(per_token),
                              batch["loss_mask"], _source_id(batch),
                              num_sources, z_loss)
  if objective is not None:
    sums["div_sum"] = distill.div_sum(per_token, batch["loss_mask"])
  return loss, sums


def _eval_sums(model_cfg, variables, batch, chunk, num_sources):
  """Un-normalised loss sums of a [B, T] batch (see loss.masked_sums)."""
  hidden_BxTxD, w_DxV, logits_fn = _hidden_and_head(model_cfg, variables,
                                                    batch)
  losses = loss_lib.token_losses(hidden_BxTxD, w_DxV, batch["targets"],
                                 logits_fn, chunk)
  return loss_lib.masked_sums(losses, batch["loss_mask"], _source_id(batch),
                              num_sources, 0.0)


def _micro_batches(batch: Batch, k: int, mesh) -> Batch:
  """[B, T] -> [k, B/k, T], micro-batch i = rows i, i+k, i+2k, ...

  Strided, not contiguous: each device's rows split evenly across the
  micro-batches, so no rows move between devices.
  """
  def fn(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch of {b} rows does not split into "
                       f"train.grad_accum={k} micro-batches")
    x = x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
    return x
  return jax.tree.map(fn, batch)


def traced_mesh(mesh: jax.sharding.Mesh | None):
  """A context setting `mesh` (abstractly) while the step is traced.

  Backends that partition themselves read it: splash attention runs under
  shard_map over batch and heads. jax.set_mesh cannot be entered inside jit;
  use_abstract_mesh can, and it composes with the jit's explicit shardings.
  """
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def make_train_step(cfg: config_dict.ConfigDict,
                    model_cfg: "models.ModelConfig",
                    mesh: jax.sharding.Mesh | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure train step `(state, batch) -> (state, metrics)`.

  batch: dict of [B, T] arrays, the GLOBAL batch (B = train.batch_size rows):
  tokens, targets, positions, segment_ids (int32), loss_mask (float32) and
  optionally source_id (int32). With train.grad_accum = k the rows are split
  into k strided micro-batches inside the step. `mesh`, if given, only adds
  sharding constraints to the micro-batches.

  metrics (all on device, float32 unless noted):
    loss             cross-entropy + z-loss, per supervised token (with
                     distillation: alpha ce + (1 - alpha) tau^2 distill + z)
    ce_loss          cross-entropy per supervised token
    distill_loss     with distillation: divergence to the teacher at tau,
                     per supervised token
    z_loss           z-loss per supervised token
    token_accuracy   argmax == target over supervised tokens
    num_supervised_tokens, num_tokens (non-padding)
    source_loss_sum, source_count   [S] per-source CE sums and token counts
    grad_norm        global norm before clipping
    update_norm, param_norm (of the trainable part after the update), lr
    finite           1.0 if loss and grad norm are finite
    skipped          1.0 if the update was skipped (train.on_nonfinite=skip)
  """
  tx = make_optimizer(cfg)
  lr_of_step = lr_schedule(cfg)
  k, chunk = cfg.train.grad_accum, cfg.train.ce_chunk
  num_sources, z_loss = _num_sources(cfg), cfg.train.z_loss
  skip_nonfinite = cfg.train.on_nonfinite == "skip"
  objective = distill.objective(cfg)
  if cfg.train.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"config train.on_nonfinite: unknown "
                     f"{cfg.train.on_nonfinite!r} (stop | skip)")

  # LoRA dropout draws its masks from (seed, step, micro-batch), so a
  # resumed run repeats them.
  dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0
  rules = (sharding.rules_from_config(cfg.sharding.rules) if mesh is not None
           else None)

  def micro_loss(trainable, frozen, mb, denom, rng):
    variables = partition.merge(trainable, frozen)
    # Traced here, so the model's activation constraints see the mesh.
    with models.activation_sharding(mesh, rules), traced_mesh(mesh):
      return _train_loss(training_model_config(frozen, model_cfg), variables,
                         mb, denom, chunk, num_sources, z_loss, cfg, objective,
                         {"dropout": rng} if dropout else None)

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: Batch):
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    rngs = jax.random.split(
        jax.random.fold_in(jax.random.key(cfg.seed), state.step), k)
    if k == 1:
      grads, sums = grad_fn(state.trainable, state.frozen, batch, denom,
                            rngs[0])
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      def body(acc, xs):
        mb, rng = xs
        g, s = grad_fn(state.trainable, state.frozen, mb, denom, rng)
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc,
                            (g, s)), None
      zeros = jax.eval_shape(
          grad_fn, state.trainable, state.frozen,
          jax.tree.map(lambda x: x[: x.shape[0] // k], batch), denom,
          rngs[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zeros)
      (grads, sums), _ = jax.lax.scan(
          body, zeros, (_micro_batches(batch, k, mesh), rngs))
    grad_norm = optim.tree_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads,
                         state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)

    loss = distill.total_loss_sum(objective, sums) / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, trainable=trainable,
                              opt_state=opt_state)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(
          lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = new_state.replace(
          trainable=keep(trainable, state.trainable),
          opt_state=keep(opt_state, state.opt_state))
    metrics = {
        "loss": loss,
        "ce_loss": sums["nll_sum"] / denom,
        "z_loss": sums["z_sum"] / denom,
        "token_accuracy": sums["correct_sum"] / denom,
        "num_supervised_tokens": sums["count"],
        "num_tokens": jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)),
        "source_loss_sum": sums["source_nll_sum"],
        "source_count": sums["source_count"],
        "grad_norm": grad_norm,
        "update_norm": optim.tree_norm(updates),
        "param_norm": optim.tree_norm(new_state.trainable),
        "lr": jnp.asarray(lr_of_step(state.step), jnp.float32),
        "finite": finite.astype(jnp.float32),
        "skipped": ((~finite) & skip_nonfinite).astype(jnp.float32),
    }
    if objective is not None:
      metrics["distill_loss"] = sums["div_sum"] / denom
    return new_state, metrics

  return train_step


def make_eval_step(cfg: config_dict.ConfigDict,
                   model_cfg: "models.ModelConfig",
                   mesh: jax.sharding.Mesh | None = None
                   ) -> Callable[[TrainState, Batch], dict]:
  """`(state, batch) -> sums` over a [B, T] batch, for the caller to reduce.

  sums: nll_sum, correct_sum, count (float32 scalars over supervised tokens)
  and [S] source_nll_sum, source_correct_sum, source_count. Loss = nll_sum /
  count, accuracy = correct_sum / count, perplexity = exp(loss).
  """
  chunk, num_sources = cfg.train.ce_chunk, _num_sources(cfg)
  rules = (sharding.rules_from_config(cfg.sharding.rules) if mesh is not None
           else None)

  def eval_step(state: TrainState, batch: Batch) -> dict:
    with models.activation_sharding(mesh, rules), traced_mesh(mesh):
      sums = _eval_sums(training_model_config(state, model_cfg),
                        partition.merge(state.trainable, state.frozen), batch,
                        chunk, num_sources)
    del sums["z_sum"]
    return sums

  return eval_step


def _check_batch_split(cfg: config_dict.ConfigDict, mesh: jax.sharding.Mesh):
  rows_per_shard = cfg.train.batch_size / (mesh.shape["data"] *
                                           mesh.shape["fsdp"])
  if rows_per_shard % cfg.train.grad_accum:
    raise ValueError(
        f"config train.batch_size={cfg.train.batch_size} must be a multiple "
        f"of mesh data x fsdp ({mesh.shape['data']} x {mesh.shape['fsdp']}) "
        f"x train.grad_accum ({cfg.train.grad_accum})")


def jit_train_step(cfg: config_dict.ConfigDict, model_cfg: "models.ModelConfig",
                   mesh: jax.sharding.Mesh, state_shardings: TrainState,
                   compiler_options: dict | None = None):
  """`make_train_step` jitted once: explicit shardings, state donated.

  compiler_options: XLA options passed to `jax.jit` (e.g. for tests).
  """
  _check_batch_split(cfg, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  return jax.jit(make_train_step(cfg, model_cfg, mesh),
                 in_shardings=(state_shardings, batch_shard),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0, compiler_options=compiler_options)


def jit_eval_step(cfg: config_dict.ConfigDict, model_cfg: "models.ModelConfig",
                  mesh: jax.sharding.Mesh, state_shardings: TrainState,
                  compiler_options: dict | None = None):
  """`make_eval_step` jitted once with explicit shardings (no donation)."""
  return jax.jit(make_eval_step(cfg, model_cfg, mesh),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=compiler_options)
