"""Run metrics on disk: TensorBoard event files and a JSONL log.

TensorBoard events are written with TensorBoard's own event-file writer and
summary protos, so no TensorFlow is needed. One `MetricsWriter` serves the
whole run; only process 0 writes, the others get a writer that does nothing.

JSONL records look like `{"step": 12, "time": 1700000000.0, "train/loss":
2.3, ...}`, one per `write_scalars` call (a step's train and eval scalars
are separate records), in step order.
"""

import json
import math
import os
import time
from typing import Any, Mapping

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer import event_file_writer


class MetricsWriter:
  """Writes scalars to `<workdir>/tb/` and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int = 0):
    """Opens the writers.

    Args:
      workdir: the run directory.
      enabled: False on every process but 0.
      resume_step: the step a resumed run restarts from. Records past it were
        written by the interrupted process after its last checkpoint and are
        about to be recomputed, so they are dropped from the JSONL file and
        marked stale in TensorBoard (a session restart at resume_step + 1,
        which TensorBoard honours by discarding the events from that step on).
    """
    self._enabled = enabled
    if not enabled:
      return
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    os.makedirs(self.tb_dir, exist_ok=True)
    # Also from step 0: a start interrupted before its first checkpoint left
    # records that this process writes again, and a step is logged once.
    _truncate_jsonl(self.jsonl_path, resume_step)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._events = event_file_writer.EventFileWriter(self.tb_dir)
    # Every process start is a session start; TensorBoard treats each one
    # after the first as a restart and drops the events at or after its step.
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=resume_step + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one step's scalars (tag -> value) to both sinks."""
    if not self._enabled:
      return
    now = time.time()
    record = {"step": int(step), "time": now}
    for tag, value in scalars.items():
      value = float(value)
      record[tag] = value if math.isfinite(value) else str(value)
      event = event_pb2.Event(wall_time=now, step=int(step),
                              summary=scalar_summary.scalar_pb(tag, value))
      self._events.add_event(event)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_hparams(self, hparams: Mapping[str, Any], trial_id: str) -> None:
    """Writes the run's hyperparameters for TensorBoard's HParams dashboard.

    Only the session (this run, named `trial_id`) is written: TensorBoard then
    builds the table from all runs under its logdir and puts the keys whose
    values differ between them first. A sweep adds its own experiment
    (`write_experiment`) at its root.

    Args:
      hparams: flat name -> bool/int/float/str (other values are stringified).
      trial_id: the name the dashboard shows for this run.
    """
    if not self._enabled:
      return
    clean = {k: _hparam_value(v) for k, v in hparams.items()}
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=0,
        summary=hparams_summary.hparams_pb(clean, trial_id=trial_id)))

  def flush(self) -> None:
    if self._enabled:
      self._events.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._events.close()
      self._jsonl.close()
      self._enabled = False


def write_experiment(logdir: str, hparams: Mapping[str, Any],
                     varying: list[str], metric_tags: list[str]) -> str:
  """The HParams experiment of a sweep, in an event file under `logdir`.

  `varying` keys are marked as differing, so the dashboard lists them first;
  the metrics are shown in the order of `metric_tags`. Returns the directory.
  """
  from tensorboard.plugins.hparams import api_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  types = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}
  infos = []
  for name in list(varying) + sorted(set(hparams) - set(varying)):
    value = _hparam_value(hparams.get(name, ""))
    infos.append(api_pb2.HParamInfo(
        name=name, differs=name in varying,
        type=types.get(type(value), api_pb2.DATA_TYPE_FLOAT64)))
  experiment = api_pb2.Experiment(
      hparam_infos=infos, time_created_secs=time.time(),
      metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t))
                    for t in metric_tags])
  summary = hparams_summary._summary_pb(  # pylint: disable=protected-access
      "_hparams_/experiment",
      plugin_data_pb2.HParamsPluginData(experiment=experiment))
  os.makedirs(logdir, exist_ok=True)
  events = event_file_writer.EventFileWriter(logdir)
  events.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                   summary=summary))
  events.close()
  return logdir


def _hparam_value(value):
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(
      value)


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps only records with step <= last_step (and a complete last line);
  from last_step 0 (a fresh start, which logs step 0 itself) none."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by the kill that interrupted the run.
      if last_step > 0 and record.get("step", 0) <= last_step:
        kept.append(json.dumps(record) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
