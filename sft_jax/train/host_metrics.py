"""A train step's device metrics turned into logged scalars on the host.

The loop hands each step's metrics to `HostMetrics.finish` one step late, so
fetching them never waits on the step just dispatched. It checks the step
was finite, adds rates (tokens/s, MFU) and per-source losses, and writes
the scalars every `log.every_steps`.
"""

import time
from typing import Any

import jax

from sft_jax.train import flops


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient norm."""


class HostMetrics:
  """Turns a step's device metrics into logged scalars, one step behind."""

  def __init__(self, cfg, model_cfg, report, source_names, mesh, writer,
               progress):
    self._cfg, self._writer, self._progress = cfg, writer, progress
    self._sources = source_names
    self._row_tokens = cfg.train.batch_size * cfg.train.seq_len
    method = cfg.method.name
    self._flops_per_token = flops.flops_per_token(
        model_cfg, cfg.train.seq_len, method,
        trainable_matmul_params=report["trainable_params"])
    peak = flops.peak_flops(mesh.devices.flat[0].device_kind)
    self._peak = peak * mesh.devices.size if peak else None
    self._last_time = None
    self.last: dict = {}
    self.skipped = 0
    self.extra: dict[int, dict] = {}  # step -> host-side scalars

  def finish(self, step: int, metrics: Any) -> dict:
    """Fetches `metrics` of `step`, checks them, logs them; returns scalars.

    Raises NonFiniteError when the step is not finite and the config says to
    stop.
    """
    m = jax.device_get(metrics)
    now = time.perf_counter()
    dt = None if self._last_time is None else now - self._last_time
    self._last_time = now
    if not m["finite"]:
      if self._cfg.train.on_nonfinite != "skip":
        raise NonFiniteError(
            f"step {step}: non-finite loss ({float(m['loss'])}) or gradient "
            f"norm ({float(m['grad_norm'])}); stopping without checkpointing "
            "this step (set train.on_nonfinite=skip to skip such updates)")
      self.skipped += 1
      self._progress.write(f"step {step}: non-finite loss or gradient; "
                           "update skipped")
    s = {f"train/{k}": float(m[k]) for k in (
        "loss", "ce_loss", "token_accuracy", "grad_norm", "update_norm",
        "param_norm", "lr", "num_supervised_tokens", "num_tokens", "skipped")}
    if self._cfg.train.z_loss:
      s["train/z_loss"] = float(m["z_loss"])
    if "distill_loss" in m:
      s["train/distill_loss"] = float(m["distill_loss"])
    s["train/packing_efficiency"] = float(m["num_tokens"]) / self._row_tokens
    # Host-side scalars of this step (examples and epochs seen).
    s.update(self.extra.pop(step, {}))
    for sid, name in enumerate(self._sources):
      if m["source_count"][sid] > 0:
        s[f"train/loss/{name}"] = float(
            m["source_loss_sum"][sid] / m["source_count"][sid])
        s[f"train/supervised_tokens/{name}"] = float(m["source_count"][sid])
    # The first step of a process also pays for compilation: no rate for it.
    if dt:
      s["perf/step_time_s"] = dt
      s["perf/tokens_per_s"] = float(m["num_tokens"]) / dt
      s["perf/supervised_tokens_per_s"] = float(
          m["num_supervised_tokens"]) / dt
      if self._peak:
        # Padding costs the same FLOPs as text: count every row token.
        s["perf/mfu"] = self._row_tokens * self._flops_per_token / (
            dt * self._peak)
    if (step % max(1, self._cfg.log.every_steps) == 0 or step == 1 or
        step == self._cfg.train.steps):
      self._writer.write_scalars(step, s)
    self._progress.update(step, s)
    self.last = s
    return s

  def restart_clock(self) -> None:
    """After an eval or a blocking save: the next interval is no step time."""
    self._last_time = None
