"""The summary of a sweep: per-point metrics, a table and a plot.

Reads each point's `metrics.jsonl`, takes the final and best value of each
chosen metric, and writes `summary.md`, `summary.csv` and `summary.png` (the
final values against the swept key). `sft_jax.sweep` runs the points.
"""

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

from sft_jax import errors

METRICS_NAME = "metrics.jsonl"

# Metrics whose names match this are better when higher; all others lower.
_HIGHER_IS_BETTER = re.compile(
    r"acc|exact_match|json_valid|schema|rouge|bleu|f1|mfu|per_s|tokens_s")


class SweepError(errors.UserError):
  """A malformed experiment, sweep point or metrics file."""
  what = "sweep"


# ------------------------------------------------------------------ summary


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in record.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = value
  return out


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file, nested keys joined with "/".

  A truncated last line (a process killed mid-write) is ignored; any other
  malformed line raises SweepError naming the file and line.
  """
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    except ValueError as e:
      if i == last:
        print(f"[sweep] {path}:{i + 1}: ignoring truncated last line",
              file=sys.stderr)
        continue
      raise SweepError(f"{path}:{i + 1}: malformed metrics line: {e}") from e
    records.append(_flatten(record))
  return records


def higher_is_better(metric: str) -> bool:
  return bool(_HIGHER_IS_BETTER.search(metric.rsplit("/", 1)[-1]))


@dataclasses.dataclass
class MetricStats:
  final: float
  final_step: int | None
  best: float
  best_step: int | None


def metric_stats(records: Iterable[Mapping[str, Any]]
                 ) -> dict[str, MetricStats]:
  """Final (last logged) and best value of every numeric metric."""
  stats = {}
  for record in records:
    step = record.get("step")
    for key, value in record.items():
      if key in ("step", "time") or isinstance(value, bool) or not isinstance(
          value, (int, float)):
        continue
      value = float(value)
      s = stats.get(key)
      if s is None:
        stats[key] = MetricStats(value, step, value, step)
        continue
      s.final, s.final_step = value, step
      better = value > s.best if higher_is_better(key) else value < s.best
      if math.isnan(s.best) or (better and not math.isnan(value)):
        s.best, s.best_step = value, step
  return stats


def default_metrics(all_stats: Iterable[Mapping[str, MetricStats]]
                    ) -> list[str]:
  """Train loss and every eval metric seen in any run."""
  names = dict.fromkeys(k for s in all_stats for k in s)
  chosen = [k for k in names
            if k in ("loss", "train/loss") or k.startswith("eval")]
  return chosen or list(names)


@dataclasses.dataclass
class Summary:
  """One row per point: swept values, status, last step and metric stats."""
  points: list[Any]  # sft_jax.sweep.Point
  status: list[str]
  steps: list[int | None]
  stats: list[dict[str, MetricStats]]
  metrics: list[str]

  def keys(self) -> list[str]:
    return list(dict.fromkeys(k for p in self.points for k in p.overrides))

  def rows(self) -> list[dict[str, Any]]:
    rows = []
    for point, status, step, stats in zip(self.points, self.status,
                                          self.steps, self.stats):
      row = {"run": point.name}
      row.update({k: point.overrides.get(k, "") for k in self.keys()})
      row.update(status=status, step="" if step is None else step)
      for m in self.metrics:
        s = stats.get(m)
        row[f"{m} final"] = "" if s is None else s.final
        row[f"{m} best"] = "" if s is None else s.best
        row[f"{m} best step"] = (
            "" if s is None or s.best_step is None else s.best_step)
      rows.append(row)
    return rows

  def csv(self) -> str:
    rows = self.rows()
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

  def markdown(self) -> str:
    rows = self.rows()
    header = [h for h in rows[0] if not h.endswith(" best step")]

    def cell(v):
      return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r[h]) for h in header) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def summarize(points: Sequence[Any],  # sft_jax.sweep.Point
              metrics: Sequence[str] | None = None) -> Summary:
  """Reads every point's metrics.jsonl into a Summary."""
  status, steps, stats = [], [], []
  for p in points:
    path = os.path.join(p.workdir, METRICS_NAME)
    records = read_metrics(path) if os.path.exists(path) else []
    stats.append(metric_stats(records))
    run_steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    steps.append(max(run_steps) if run_steps else None)
    if p.done:
      status.append("done")
    elif not os.path.isdir(p.workdir):
      status.append("not started")
    else:
      status.append("unfinished" if records else "no metrics")
  metrics = list(metrics) if metrics else default_metrics(stats)
  return Summary(list(points), status, steps, stats, metrics)


def _swept_key(summary: Summary, x: str | None) -> str | None:
  keys = summary.keys()
  if x is not None:
    if x not in keys:
      raise SweepError(f"--x {x!r} is not a swept key; swept keys: {keys}")
    return x
  for k in keys:
    if len({repr(p.overrides.get(k)) for p in summary.points}) > 1:
      return k
  return keys[0] if keys else None


def _follows(points, x: str, key: str) -> bool:
  """Whether `key` is a function of `x` across the points (co-varies with it:
  e.g. general share s and domain share 1 - s), so it splits no line."""
  seen = {}
  for p in points:
    xv, kv = repr(p.overrides.get(x)), repr(p.overrides.get(key))
    if seen.setdefault(xv, kv) != kv:
      return False
  return True


def varying_keys(summary: Summary) -> list[str]:
  """Swept keys that take more than one value, in sweep order."""
  return [k for k in summary.keys()
          if len({repr(p.overrides.get(k)) for p in summary.points}) > 1]


def plot(summary: Summary, path: str, *, x: str | None = None,
         metrics: Sequence[str] | None = None) -> str | None:
  """Final value of each metric against swept key `x`, one panel per metric.

  Points differing in other swept keys are drawn as separate lines. Returns the
  PNG path, or None when there is no swept key or nothing to plot.
  """
  x = _swept_key(summary, x)
  metrics = [m for m in (metrics or summary.metrics)
             if any(m in s for s in summary.stats)]
  if x is None or not metrics:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  others = [k for k in summary.keys()
            if k != x and not _follows(summary.points, x, k)]
  groups = {}
  for p, s in zip(summary.points, summary.stats):
    label = ", ".join(f"{k}={p.overrides.get(k)}" for k in others)
    groups.setdefault(label, []).append((p.overrides.get(x), s))
  xs_all = [p.overrides.get(x) for p in summary.points]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in xs_all)
  categories = list(dict.fromkeys(map(str, xs_all)))

  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4),
                           squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for label, items in groups.items():
      items = [(v, s[m].final) for v, s in items if m in s]
      if numeric:
        items.sort(key=lambda t: t[0])
        xs = [v for v, _ in items]
      else:
        xs = [categories.index(str(v)) for v, _ in items]
      ax.plot(xs, [y for _, y in items], marker="o", label=label or None)
    if not numeric:
      ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x)
    ax.set_title(m + (" (higher is better)" if higher_is_better(m)
                      else " (lower is better)"), fontsize=9)
    ax.grid(alpha=0.3)
    if others:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_summary(summary: Summary, workdir: str, *, x: str | None = None
                  ) -> dict[str, str]:
  """Writes summary.md, summary.csv and summary.png under `workdir`."""
  paths = {"md": os.path.join(workdir, "summary.md"),
           "csv": os.path.join(workdir, "summary.csv")}
  with open(paths["md"], "w") as f:
    f.write(summary.markdown())
  with open(paths["csv"], "w") as f:
    f.write(summary.csv())
  png = plot(summary, os.path.join(workdir, "summary.png"), x=x)
  if png:
    paths["png"] = png
  return paths


# ---------------------------------------------------------------------- CLI
