"""Periodic evaluation during training: held-out loss, and early stopping.

Each eval set (one per `data.eval_sources` entry, so per source) is read in
full; its sums over every supervised token give

  eval/<set>/loss        mean next-token cross-entropy (nats per token)
  eval/<set>/perplexity  exp(loss)
  eval/<set>/accuracy    fraction of supervised tokens whose argmax is right
  eval/<set>/tokens      supervised tokens evaluated

and `eval/loss`, `eval/perplexity`, `eval/accuracy` pool every set (token
weighted). With `eval.generate` the generation metrics of
`sft_jax.infer.evaluate.generation_metrics` are added as `eval/gen/<name>`;
each `eval.ranking` set adds `eval/<name>/top1`, `top5` and `mrr` (its
candidates ranked by log-probability, as `sft-jax score` does).
"""

import math
import types
from typing import Any, Callable, Mapping

import jax
import numpy as np
from ml_collections import config_dict

from sft_jax.train import sharding
from sft_jax.train import step as step_lib


def eval_losses(eval_step: Callable, state: Any,
                eval_batches: Mapping[str, list], mesh) -> dict[str, float]:
  """Loss, perplexity and accuracy of every eval set (see module doc).

  Args:
    eval_step: the jitted `step.make_eval_step` function.
    state: the TrainState.
    eval_batches: {set name: [this process's rows of each batch]}, as made by
      `data.make_eval_batches`.
    mesh: the device mesh the batches are sharded over.
  """
  per_set = {}
  for name, batches in eval_batches.items():
    # Dispatch every batch, then fetch once: the device never waits on the
    # host between batches. Each set is one source, so source_id (indexing
    # eval sets) is not needed by the step.
    outs = [eval_step(state, sharding.global_batch(
        {k: v for k, v in b.items() if k != "source_id"}, mesh))
            for b in batches]
    sums = {"nll_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
    for out in jax.device_get(outs):
      for key in sums:
        sums[key] += float(np.asarray(out[key], np.float64))
    per_set[name] = sums
  metrics = {}
  pooled = {"nll_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
  for name, sums in per_set.items():
    metrics.update(_summarise(f"eval/{name}", sums))
    for key in pooled:
      pooled[key] += sums[key]
  if per_set:
    metrics.update(_summarise("eval", pooled))
  return metrics


def loss_metrics(model_cfg, variables: dict, eval_batches: Mapping[str, list],
                 *, ce_chunk: int) -> dict[str, float]:
  """`eval_losses` of a model outside training: any variables, one host.

  The batches (from `data.make_eval_batches` with process_count=1) stay
  uncommitted host arrays, so the step runs wherever `variables` live.
  """
  cfg = config_dict.ConfigDict({"train": {"ce_chunk": ce_chunk},
                                "data": {"sources": {}}})
  step_fn = step_lib.make_eval_step(cfg, model_cfg)
  # make_eval_step reads the variables of a TrainState (the merge of its
  # trainable and frozen parts): here all of them count as "trainable".
  eval_fn = jax.jit(lambda v, b: step_fn(
      types.SimpleNamespace(trainable=v, frozen={}), b))
  metrics, pooled = {}, {"nll_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
  for name, batches in eval_batches.items():
    outs = jax.device_get([eval_fn(variables, {
        k: v for k, v in b.items() if k != "source_id"}) for b in batches])
    sums = {k: sum(float(np.asarray(o[k], np.float64)) for o in outs)
            for k in pooled}
    metrics.update(_summarise(f"eval/{name}", sums))
    for key in pooled:
      pooled[key] += sums[key]
  if eval_batches:
    metrics.update(_summarise("eval", pooled))
  return metrics


def _summarise(prefix: str, sums: Mapping[str, float]) -> dict[str, float]:
  if sums["count"] == 0:
    raise ValueError(f"{prefix}: the eval set has no supervised token")
  loss = sums["nll_sum"] / sums["count"]
  return {f"{prefix}/loss": loss,
          f"{prefix}/perplexity": math.exp(min(loss, 700.0)),
          f"{prefix}/accuracy": sums["correct_sum"] / sums["count"],
          f"{prefix}/tokens": sums["count"]}


def load_ranking_sets(cfg: config_dict.ConfigDict, tokenizer) -> dict:
  """{name: tokenized requests} of `eval.ranking`; ValueError names file:line."""
  from sft_jax import score  # pylint: disable=g-import-not-at-top
  if cfg.eval.ranking and jax.process_count() > 1:
    raise ValueError("config eval.ranking: ranking evaluation runs on one "
                     "process only (score the saved run with `sft-jax score`)")
  sets = {}
  for name, path in cfg.eval.ranking.items():
    requests = score.read_requests(path, tokenizer)
    unlabelled = [r.where for r in requests if not r.labels]
    if unlabelled:
      raise score.ScoreInputError(
          f"{unlabelled[0]}: eval.ranking.{name}: a ranking line needs "
          "'candidates' and 'label'")
    sets[name] = requests
  return sets


def ranking_eval(model_cfg, state: Any, ranking_sets: Mapping[str, list],
                 batch_size: int) -> dict[str, float]:
  """eval/<name>/top1, top5, mrr: candidates ranked by log-probability."""
  from sft_jax import score  # pylint: disable=g-import-not-at-top
  variables = step_lib.variables_of(state)
  metrics = {}
  for name, requests in ranking_sets.items():
    records = list(score.score_requests(
        model_cfg, variables["params"], requests, batch_size=batch_size,
        lora=variables.get("lora")))
    m = score.ranking_metrics(records)
    for key in ("top1", "top5", "mrr"):
      metrics[f"eval/{name}/{key}"] = m[key]
  return metrics


def generation_eval(cfg: config_dict.ConfigDict, model_cfg, state: Any,
                    tokenizer, *, out_dir: str | None = None,
                    step: int = 0) -> dict[str, float]:
  """`eval/gen/<metric>` of generating answers for `eval.generate_data`.

  With `out_dir`, the metrics and every sample generation are also written to
  `{out_dir}/gen_step_{step}.json`.
  """
  # Imported here: generation pulls in the decoding code, which only runs
  # when generation-based evaluation is switched on.
  from sft_jax.infer import evaluate as infer_eval  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  if not cfg.eval.generate_data:
    raise ValueError("config eval.generate is on but eval.generate_data "
                     "(a JSONL file of held-out records) is empty")
  records = [r for r, _ in prompting.read_jsonl(cfg.eval.generate_data)]
  if cfg.eval.generate_max_records:
    records = records[:cfg.eval.generate_max_records]
  metrics, samples = infer_eval.generation_metrics(
      model_cfg, step_lib.variables_of(state), tokenizer, records,
      max_new_tokens=cfg.eval.generate_max_new_tokens,
      metrics=tuple(cfg.eval.generate_metrics),
      batch_size=cfg.eval.generate_batch_size, seed=cfg.seed,
      template_kwargs=prompting.template_kwargs_of_data(cfg.data.to_dict()))
  if out_dir is not None:
    infer_eval.write_results(out_dir, step, metrics, samples, prefix="gen")
  return {f"eval/gen/{k}": float(v) for k, v in metrics.items()}


class EarlyStopping:
  """Stops when `metric` has not improved for `patience` evaluations."""

  def __init__(self, metric: str, mode: str = "min", patience: int = 3,
               min_delta: float = 0.0):
    if mode not in ("min", "max"):
      raise ValueError(f"config eval.early_stop_mode must be 'min' or 'max', "
                       f"got {mode!r}")
    self.metric, self.mode = metric, mode
    self.patience, self.min_delta = patience, min_delta
    self.best: float | None = None
    self.bad_evals = 0

  def update(self, metrics: Mapping[str, float]) -> bool:
    """Records one evaluation; True when training should stop."""
    if self.metric not in metrics:
      raise KeyError(f"config eval.early_stop_metric={self.metric!r} is not "
                     f"an eval metric; have {sorted(metrics)}")
    value = float(metrics[self.metric])
    sign = 1.0 if self.mode == "min" else -1.0
    if self.best is None or sign * (self.best - value) > self.min_delta:
      self.best, self.bad_evals = value, 0
    else:
      self.bad_evals += 1
    return self.bad_evals >= self.patience

  def state_dict(self) -> dict:
    return {"best": self.best, "bad_evals": self.bad_evals}

  def load_state_dict(self, d: Mapping[str, Any]) -> None:
    self.best, self.bad_evals = d["best"], d["bad_evals"]
