"""Orbax checkpoints of a run: train state, data position, config, tokenizer.

Layout of `<workdir>/checkpoints/<step>/`:

  state/      the TrainState pytree (sharded arrays; written asynchronously)
  data/       iterator.json, the Grain iterator state of the global stream
              (the same on every process), so a resumed run, on any mesh or
              process count, reads exactly the batches it would have read
  config/     the resolved config (JSON)
  tokenizer/  the tokenizer files, chat template included
  metrics/    eval metrics of that step, when there were any (Orbax's own)

Saves are asynchronous: `save` returns once the arrays are copied off the
device, and the files are committed in the background; a step directory only
appears (renamed from a temporary one) once complete, so a kill mid-save
leaves the previous checkpoints intact. Retention keeps the last `keep` steps
plus, when a best metric is set, the best step by that metric.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

_STATE, _DATA, _CONFIG, _TOKENIZER = "state", "data", "config", "tokenizer"


class _NoMetricsNotice(logging.Filter):
  """Drops Orbax's warning for saves without eval metrics: only evaluated
  steps carry them, by design."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


_NO_METRICS_NOTICE = _NoMetricsNotice()


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """The data iterator state: one JSON document, written by process 0.

  Every process iterates the same global stream (see data.pipeline), so one
  state serves any process count and mesh on resume.
  """

  _NAME = "iterator.json"

  def save(self, directory, args):
    if jax.process_index() == 0:
      (directory / self._NAME).write_text(json.dumps(args.item))

  def restore(self, directory, args=None):
    path = directory / self._NAME
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise ValueError(
          f"{path}: no data-iterator state (the directory holds {found}); "
          "this checkpoint was written by an older layout that kept one "
          "state per process and cannot be resumed by this version.")
    return json.loads(path.read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


class _FilesHandler(ocp.CheckpointHandler):
  """A flat set of files (name -> bytes), written by process 0."""

  # Orbax adds its own marker files to item directories; the manifest says
  # which files are ours.
  _MANIFEST = "files.json"

  def save(self, directory, args):
    if jax.process_index() != 0:
      return
    for name, content in args.files.items():
      (directory / name).write_bytes(content)
    (directory / self._MANIFEST).write_text(json.dumps(sorted(args.files)))

  def restore(self, directory, args=None):
    names = json.loads((directory / self._MANIFEST).read_text())
    return {name: (directory / name).read_bytes() for name in names}


@ocp.args.register_with_handler(_FilesHandler, for_save=True)
@dataclasses.dataclass
class _FilesSave(ocp.args.CheckpointArgs):
  files: Mapping[str, bytes]


@ocp.args.register_with_handler(_FilesHandler, for_restore=True)
@dataclasses.dataclass
class _FilesRestore(ocp.args.CheckpointArgs):
  pass


def read_files(directory: str) -> dict[str, bytes]:
  """Every regular file directly in `directory`, name -> bytes."""
  out = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


class Checkpointer:
  """Saves and restores the checkpoints of one run directory."""

  def __init__(self, directory: str, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True, read_only: bool = False):
    """Opens (and creates) `directory`.

    Args:
      directory: `<workdir>/checkpoints`.
      keep: how many of the most recent checkpoints to keep.
      best_metric: a metric name passed to `save(metrics=...)`; the best step
        by it is kept as well as the last `keep`. None: keep only the last.
      best_mode: "min" or "max": which way `best_metric` is better.
      async_save: write files in the background.
      read_only: open an existing directory for restoring only.
    """
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    policies = [ocp_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(ocp_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self._best_metric = best_metric
    # best_fn is what makes Orbax write each step's metrics to disk, so the
    # best step is still known after a restart.
    best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
    if best_metric:
      logging.getLogger("absl").addFilter(_NO_METRICS_NOTICE)  # Added once.
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only,
        # Half-written steps of a killed process are never resumed from;
        # clear them when the run restarts.
        cleanup_tmp_directories=not read_only)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(_STATE, _DATA, _CONFIG, _TOKENIZER))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without one)."""
    return self._manager.best_step() if self._best_metric else None

  def save(self, step: int, state: Any, *, data_state: Any,
           config: Mapping[str, Any], tokenizer_files: Mapping[str, bytes],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts saving checkpoint `step` (every process calls this).

    Args:
      step: the number of optimizer updates applied to `state`.
      state: the train state pytree (jax arrays, possibly sharded).
      data_state: this process's data iterator state (JSON-serialisable),
        positioned at the first batch step `step + 1` will read.
      config: the resolved config as a plain dict.
      tokenizer_files: file name -> content.
      metrics: eval metrics of this step (for keeping the best checkpoint).
    """
    if metrics is not None and self._best_metric:
      if self._best_metric not in metrics:
        raise KeyError(
            f"best checkpoint metric {self._best_metric!r} is not among the "
            f"eval metrics {sorted(metrics)}")
      metrics = {k: float(v) for k, v in metrics.items()}
    else:
      metrics = None
    self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: _ProcessJsonSave(data_state),
        _CONFIG: ocp.args.JsonSave(dict(config)),
        _TOKENIZER: _FilesSave(dict(tokenizer_files)),
    }), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, *,
              with_data: bool = True) -> tuple[Any, Any]:
    """Restores (state, data_state) of checkpoint `step`.

    Args:
      step: a step from `all_steps()`.
      abstract_state: the state pytree as `jax.ShapeDtypeStruct`s carrying
        the target shardings; arrays are read straight into those shards.
      with_data: also read this process's data iterator state (else None).
    """
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items[_DATA] = _ProcessJsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE], (restored[_DATA] if with_data else None)

  def restore_newest_readable(self, abstract_state: Any
                              ) -> tuple[int, Any, Any, list[str]]:
    """(step, state, data_state, warnings) of the newest readable checkpoint.

    A checkpoint that fails to restore (a truncated or missing file, e.g. a
    disk filled or a copy cut short) is skipped and the previous one is
    tried. Once an older one restores, each skipped one is renamed
    `<step>.unreadable` (kept for inspection, out of Orbax's sight) and
    returned as a warning naming its directory and the error. When none
    restores (most likely a config that does not fit the run), nothing is
    renamed and the newest one's error is raised.
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # any unreadable file, whatever Orbax raises
        failed.append((step, e))
        continue
      warnings = []
      for bad, e in failed:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = (f"checkpoint {self.step_dir(bad)} is unreadable "
               f"({type(e).__name__}: {first[:300]}); resumed from step "
               f"{step} and moved it to {bad}.unreadable")
        logging.warning(msg)
        warnings.append(msg)
        if jax.process_index() == 0:
          os.replace(self.step_dir(bad), self.step_dir(bad) + ".unreadable")
      if failed:
        self._manager.reload()
      return step, state, data_state, warnings
    if failed:
      raise failed[0][1]
    raise ValueError(f"{self.directory}: no checkpoint to restore")

  def restore_state_subset(self, step: int, abstract_subset: Any) -> Any:
    """Restores only the sub-tree of the saved state that `abstract_subset`
    names (e.g. {"step", "trainable"} without the optimizer state)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subset)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeRestore(abstract_subset,
                                       restore_args=restore_args,
                                       partial_restore=True)}))
    return restored[_STATE]

  def restore_config(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_CONFIG: ocp.args.JsonRestore()}))
    return restored[_CONFIG]

  def restore_tokenizer_files(self, step: int) -> dict[str, bytes]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_TOKENIZER: _FilesRestore()}))
    return restored[_TOKENIZER]

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
