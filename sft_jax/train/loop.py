"""The training loop: data -> jitted step -> metrics, evals and checkpoints.

  result = loop.train(cfg, workdir)

Per step the loop reads this host's rows, assembles the global batch,
dispatches the step, and only then fetches the PREVIOUS step's metrics, so
the device always has the next step queued while the host logs. Checkpoint,
eval and final steps are the exceptions: their own metrics are fetched first,
because a state is saved only once its step is known to be finite (a
non-finite loss or gradient stops the run before anything of it is written).

A checkpoint holds the trainable part of the state, the optimizer state and
the step; frozen weights (the base model under LoRA or `freeze`) are not
copied into every checkpoint but re-created from `model.path` (or the seed),
which the resolved config records.
"""

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
from ml_collections import config_dict

from sft_jax import data
from sft_jax import errors
from sft_jax import models
from sft_jax import progress as progress_lib
from sft_jax.train import checkpoint as checkpoint_lib
from sft_jax.train import config as config_lib
from sft_jax.train import distill
from sft_jax.train import distributed
from sft_jax.train import epochs as epochs_lib
from sft_jax.train import evaluate
from sft_jax.train import host_metrics
from sft_jax.train import metrics_writer
from sft_jax.train import resume as resume_lib
from sft_jax.train import sharding
from sft_jax.train import model_setup
from sft_jax.train import step as step_lib
from sft_jax.train.host_metrics import NonFiniteError  # pylint: disable=unused-import

EXIT_OK, EXIT_NONFINITE = errors.EXIT_OK, errors.EXIT_NONFINITE
EXIT_PREEMPTED = errors.EXIT_PREEMPTED


@dataclasses.dataclass
class TrainResult:
  """How a `train` call ended."""
  exit_code: int  # 0 finished / early-stopped; 75 preempted (saved); 3.
  step: int  # The last step whose update was applied and verified.
  reason: str  # "finished" | "early_stopped" | "preempted" | "nonfinite"
  metrics: dict  # The last logged train (and eval) scalars.


def checkpointed_part(state: step_lib.TrainState) -> dict:
  """What a checkpoint stores of a state (frozen weights are re-created)."""
  return {"step": state.step, "trainable": state.trainable,
          "opt_state": state.opt_state}


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


class _Preemption:
  """Notices SIGTERM and SIGINT (Ctrl-C): a flag on one process; JAX's sync
  point on several.

  The step in flight finishes, is checkpointed, and the run exits with
  EXIT_PREEMPTED; a second SIGINT exits at once (what is already committed
  stays). With several processes every one must stop at the same step, so
  the decision comes from `reached_preemption_sync_point`, which JAX's
  distributed runtime drives from SIGTERM itself.
  """

  def __init__(self):
    self._flag = False
    self._multi = jax.process_count() > 1
    self._previous = {}
    # Signal handlers can only be set from the main thread; a loop run from
    # another thread leaves the signals to its caller.
    main_thread = threading.current_thread() is threading.main_thread()
    # Several processes must agree on the step: there only JAX's SIGTERM
    # sync point decides (a Ctrl-C stays a KeyboardInterrupt).
    if main_thread and not self._multi:
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._flag:
      raise KeyboardInterrupt  # The second Ctrl-C: no waiting for a save.
    self._flag = True
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving a checkpoint after this step, then exiting "
            "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _load_tokenizer(cfg, workdir: str, resuming: bool):
  saved = os.path.join(workdir, "tokenizer")
  if resuming and os.path.isdir(saved):
    # The exact tokenizer and chat template the run started with.
    return data.load_tokenizer(saved)
  path = cfg.data.tokenizer or cfg.model.path
  if not path:
    raise ValueError("config: set data.tokenizer (or model.path, whose "
                     "tokenizer is used by default)")
  return data.load_tokenizer(path, cfg.data.chat_template or None)


def train(cfg: config_dict.ConfigDict, workdir: str, *,
          progress: bool = True, resume_change: bool = False,
          schedule_on_resume: str | None = None) -> TrainResult:
  """Trains (or resumes) the run in `workdir`; see the module docstring.

  resume_change: resume even if the base model, tokenizer or architecture
    differ from the run's start (see resume.py); schedule_on_resume: "keep"
    "stretch" or "restart" when a resume changes train.steps.
  """
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  errors.check_writable_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
      best_metric=cfg.checkpoint.best_metric or None,
      best_mode=cfg.checkpoint.best_mode,
      async_save=cfg.checkpoint.async_save)
  resume_step = ckpt.latest_step()
  if cfg.train.epochs > 0:
    tok = _load_tokenizer(cfg, workdir, resume_step is not None)
    plan = epochs_lib.plan(cfg, tok)
    cfg.train.steps = plan.steps
    if is_main:
      print(f"train.epochs={cfg.train.epochs:g}: {sum(plan.sizes.values()):,} "
            f"examples in {len(plan.sizes)} sources, "
            f"{plan.examples_per_row:.2f} examples per packed row -> "
            f"train.steps={plan.steps}", flush=True)
  if resume_step is not None and resume_step >= cfg.train.steps:
    print(f"{workdir}: already trained to step {resume_step} >= "
          f"train.steps={cfg.train.steps}; nothing to do.", flush=True)
    ckpt.close()
    return TrainResult(EXIT_OK, resume_step, "finished", {})
  bar = progress_lib.TrainProgress(cfg.train.steps, resume_step or 0,
                                   is_main, progress, cfg.log.every_steps)
  if resume_step is not None:
    bar.write(f"Resuming from the checkpoint of step {resume_step} in "
              f"{ckpt.directory}")
    try:
      resume_lib.check(cfg, workdir, resume_step, allow_change=resume_change,
                       schedule_choice=schedule_on_resume, write=bar.write)
    except errors.UserError:
      ckpt.close()
      raise

  tok = _load_tokenizer(cfg, workdir, resume_step is not None)
  tok_dir = os.path.join(workdir, "tokenizer")
  if is_main and resume_step is None:
    # A resume rewrites config.json only once its checkpoint is restored: a
    # refused or failed resume leaves the run as it was.
    config_lib.save_config(cfg, os.path.join(workdir, "config.json"))
    tok.save_pretrained(tok_dir)
  tokenizer_files = checkpoint_lib.read_files(tok_dir) if is_main else {}

  mesh = sharding.make_mesh(cfg.mesh)
  if cfg.model.path and cfg.model.init == "pretrained":
    # A hub id is downloaded by process 0 first: with HF_HOME on shared
    # storage, once per filesystem instead of once per host.
    distributed.main_process_first(lambda: models.resolve(cfg.model.path),
                                   "download", cfg.distributed.barrier_timeout_s)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  if distill.enabled(cfg) and not distill.is_offline(cfg):
    variables["teacher"] = distill.load_teacher(cfg, mesh)
  if is_main and resume_step is None:
    # After loading, so a hub model is in the local cache and gets hashed.
    resume_lib.record_identity(cfg, workdir)
  state, state_shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                                     mesh)
  del variables
  report = step_lib.param_report(cfg, model_cfg, state)
  bar.write("params: {trainable_params:,} trainable of {total_params:,} "
            "({share:.2f}%); optimizer state {opt_state_bytes:,} bytes".format(
                share=100 * report["trainable_params"] /
                max(1, report["total_params"]), **report))
  bar.write(models.attention_summary(model_cfg))

  # Process 0 tokenizes into data.cache_dir first; on storage every host
  # sees, the others then read its cache instead of tokenizing again.
  pipeline = distributed.main_process_first(
      lambda: data.make_train_pipeline(
          cfg.data, tok, seq_len=cfg.train.seq_len,
          batch_size=cfg.train.batch_size, seed=cfg.seed,
          teacher_cache=cfg.distill.cache,
          rows=sharding.process_rows(mesh, cfg.train.batch_size)),
      "tokenize", cfg.distributed.barrier_timeout_s)
  batches = iter(pipeline)
  seen = epochs_lib.Seen(
      data.source_names(cfg.data),
      epochs_lib.source_sizes(cfg.data, tok, cfg.train.seq_len),
      len(sharding.process_rows(mesh, cfg.train.batch_size))
      / cfg.train.batch_size)
  early = None
  if cfg.eval.early_stop_metric:
    early = evaluate.EarlyStopping(
        cfg.eval.early_stop_metric, cfg.eval.early_stop_mode,
        cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta)

  if resume_step is not None:
    part = checkpointed_part(state)
    target = _abstract(part, checkpointed_part(state_shardings))
    # Drop the fresh arrays before reading the saved ones into their place.
    state = state.replace(trainable=None, opt_state=None)
    del part
    try:
      resume_step, restored, host_state, warnings = (
          ckpt.restore_newest_readable(target))
    except (ValueError, KeyError, TypeError) as e:
      ckpt.close()
      raise errors.ResumeError(
          f"{ckpt.directory}/{resume_step}: the checkpoint does not fit the "
          f"configured model ({type(e).__name__}: {str(e).splitlines()[0]}"
          "); resume with the config the run was started with, or use a new "
          "--workdir") from e
    for w in warnings:
      bar.write(f"warning: {w}")
    state = state.replace(**restored)
    batches.set_state(host_state["iterator"])
    seen.load_state_dict(host_state.get("examples_seen"))
    if is_main:
      config_lib.save_config(cfg, os.path.join(workdir, "config.json"))
    if early is not None and host_state.get("early_stopping"):
      early.load_state_dict(host_state["early_stopping"])
  start = int(jax.device_get(state.step))

  writer = metrics_writer.MetricsWriter(workdir, enabled=is_main,
                                        resume_step=start)
  eval_sets = {}
  if cfg.eval.every_steps > 0 or cfg.eval.on_start:
    eval_sets = distributed.main_process_first(
        lambda: data.make_eval_batches(
            cfg.data, tok, seq_len=cfg.train.seq_len,
            batch_size=cfg.eval.batch_size,
            rows=sharding.process_rows(mesh, cfg.eval.batch_size)),
        "tokenize_eval", cfg.distributed.barrier_timeout_s)
  if start == 0:
    writer.write_hparams(config_lib.flatten_config(cfg),
                         trial_id=os.path.basename(workdir))
    writer.write_scalars(0, {f"params/{k}": v for k, v in report.items()})

  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, state_shardings)
  ranking_sets = (evaluate.load_ranking_sets(cfg, tok)
                  if cfg.eval.every_steps > 0 else {})
  eval_step = (step_lib.jit_eval_step(cfg, model_cfg, mesh, state_shardings)
               if eval_sets or cfg.eval.generate or ranking_sets else None)
  host = host_metrics.HostMetrics(cfg, model_cfg, report, data.source_names(cfg.data),
                      mesh, writer, bar)
  preemption = _Preemption()
  saved_step = resume_step

  def save(step, eval_metrics=None):
    nonlocal saved_step
    if saved_step == step:
      return
    host_state = {"iterator": batches.get_state(),
                  "early_stopping": early.state_dict() if early else None,
                  "examples_seen": seen.state_dict()}
    t = time.perf_counter()
    ckpt.save(step, checkpointed_part(state), data_state=host_state,
              config=config_lib.config_to_dict(cfg),
              tokenizer_files=tokenizer_files, metrics=eval_metrics)
    bar.write(f"saved checkpoint {step} ({time.perf_counter() - t:.1f}s" + (
        "; files written in the background)" if cfg.checkpoint.async_save
        else ")"))
    saved_step = step

  reason, exit_code, step = "finished", EXIT_OK, start
  pending = None  # (step, device metrics) not yet fetched.

  def run_eval(step):
    eval_metrics = evaluate.eval_losses(eval_step, state, eval_sets, mesh)
    if ranking_sets:
      eval_metrics.update(evaluate.ranking_eval(
          model_cfg, state, ranking_sets, cfg.eval.batch_size))
    if cfg.eval.generate:
      eval_metrics.update(evaluate.generation_eval(
          cfg, model_cfg, state, tok, step=step,
          out_dir=os.path.join(workdir, "eval") if is_main else None))
    writer.write_scalars(step, eval_metrics)
    bar.write(f"step {step}: " + "  ".join(
        f"{k} {v:.4f}" for k, v in eval_metrics.items()
        if not k.endswith("/tokens")))
    return eval_metrics

  if start == 0 and cfg.eval.on_start and eval_step is not None:
    # The "before" point of every eval curve: the model as loaded.
    host.last.update(run_eval(0))
  try:
    for step in range(start + 1, cfg.train.steps + 1):
      local_batch = next(batches)
      seen.add(local_batch)
      batch = sharding.global_batch(local_batch, mesh)
      if step == start + 1:
        bar.write("compiling the train step...")
        compile_start = time.perf_counter()
      state, metrics = train_step(state, batch)
      if step == start + 1:
        # The first call compiles before it dispatches the step.
        bar.write(f"compiled the train step in "
                  f"{time.perf_counter() - compile_start:.1f}s")
      if pending is not None:
        host.finish(*pending)
      host.extra[step] = seen.scalars()
      pending = (step, metrics)

      every = lambda n: n > 0 and step % n == 0
      last = step == cfg.train.steps
      stop_now = preemption.reached(step)
      do_eval = (eval_step is not None and cfg.eval.every_steps > 0 and
                 (every(cfg.eval.every_steps) or last))
      do_save = every(cfg.checkpoint.every_steps) or last or stop_now
      if not (do_eval or do_save):
        continue
      host.finish(*pending)  # Verify this step before saving or evaluating.
      pending = None
      eval_metrics = None
      if do_eval:
        eval_metrics = run_eval(step)
        host.last.update(eval_metrics)
        if early is not None and early.update(eval_metrics):
          reason = "early_stopped"
        if cfg.checkpoint.best_metric:
          do_save = True  # Every evaluated step is a candidate for best.
      if do_save or reason != "finished":
        save(step, eval_metrics)
      host.restart_clock()
      if stop_now:
        reason = "preempted"
      if reason != "finished":
        break
  except NonFiniteError as e:
    bar.write(f"error: {e}; last checkpoint: step {saved_step}")
    reason, exit_code = "nonfinite", EXIT_NONFINITE
  finally:
    preemption.close()
    bar.close()
    ckpt.close()
    writer.close()

  if reason != "nonfinite" and "train/loss" in host.last:
    bar.write(f"{reason.replace('_', ' ').capitalize()} at step {step}: "
              f"train/loss {host.last['train/loss']:.4f}; run directory "
              f"{workdir}")
  if reason == "preempted":
    exit_code = EXIT_PREEMPTED
    print(f"Preempted: saved step {step}; rerun the same command to resume "
          f"(exit code {EXIT_PREEMPTED}).", file=sys.stderr, flush=True)
  elif reason == "early_stopped":
    print(f"Early stop at step {step}: {cfg.eval.early_stop_metric} has not "
          f"improved for {early.patience} evaluations (best "
          f"{early.best:.6g}).", flush=True)
  final_step = step if reason != "nonfinite" else (saved_step or 0)
  return TrainResult(exit_code=exit_code, step=final_step, reason=reason,
                     metrics=host.last)

