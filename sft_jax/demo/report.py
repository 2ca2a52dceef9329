"""The demo's before/after numbers, read from the runs' metrics.jsonl files.

"Before" is the final evaluation of the continued-pretraining run (the model
the SFT stage starts from); "after" is the final evaluation of each SFT sweep
point. Both evaluate the same held-out sets:

  eval/gen/exact_match   greedy answer == reference JSON string (domain task)
  eval/gen/json_valid    greedy answer parses as JSON
  field_accuracy         fraction of the JSON fields the greedy answer gets
                         right (from the saved samples, eval/gen_step_N.json)
  eval/domain/accuracy   next-token accuracy on the reference answers
  eval/domain/loss       nats/token on the reference answers
  eval/general/loss      nats/token on held-out human chat (forgetting)
"""

import json
import os

from sft_jax import sweep
from sft_jax import sweep_summary
from sft_jax.demo import task

SHARE_KEY = "data.sources.general.weight"
# name in the report -> metrics.jsonl key
METRICS = {
    "exact_match": "eval/gen/exact_match",
    "json_valid": "eval/gen/json_valid",
    "domain_accuracy": "eval/domain/accuracy",
    "domain_loss": "eval/domain/loss",
    "general_loss": "eval/general/loss",
}
SWEEP_METRICS = tuple(METRICS.values()) + ("train/loss",)
# The report's columns: METRICS plus field_accuracy, computed from samples.
COLUMNS = ("exact_match", "field_accuracy", "json_valid", "domain_accuracy",
           "domain_loss", "general_loss")
_LABELS = {
    "exact_match": "exact match (held-out task)",
    "field_accuracy": "fields right (held-out task)",
    "json_valid": "valid JSON (held-out task)",
    "domain_accuracy": "answer token accuracy (held-out task)",
    "domain_loss": "task answer loss (nats/token)",
    "general_loss": "general chat loss (nats/token)",
}


def _final(run_dir: str) -> dict:
  """The last logged value of each report metric, and its step."""
  stats = sweep_summary.metric_stats(
      sweep_summary.read_metrics(os.path.join(run_dir, sweep_summary.METRICS_NAME)))
  out = {}
  for name, key in METRICS.items():
    if key not in stats:
      raise ValueError(f"{run_dir}: no {key} in metrics.jsonl; did its "
                       "final evaluation run?")
    out[name] = stats[key].final
  out["step"] = stats[METRICS["general_loss"]].final_step
  out["field_accuracy"] = _field_accuracy(
      run_dir, stats[METRICS["exact_match"]].final_step)
  return out


def _start(run_dir: str) -> dict:
  """The step-0 evaluation of an SFT run (eval.on_start): before SFT."""
  first = {}
  for r in sweep_summary.read_metrics(
      os.path.join(run_dir, sweep_summary.METRICS_NAME)):
    if r["step"] == 0:
      first.update(r)
  missing = [k for k in METRICS.values() if k not in first]
  if missing:
    raise ValueError(f"{run_dir}: no step-0 evaluation of {missing}; is "
                     "eval.on_start set?")
  out = {name: first[key] for name, key in METRICS.items()}
  out["step"] = 0
  out["field_accuracy"] = _field_accuracy(run_dir, 0)
  return out


def _field_accuracy(run_dir: str, step: int) -> float:
  """Mean task.field_accuracy over the greedy samples saved at `step`."""
  path = os.path.join(run_dir, "eval", f"gen_step_{step}.json")
  with open(path, encoding="utf-8") as f:
    samples = json.load(f)["samples"]
  if not samples:
    raise ValueError(f"{path}: no samples")
  return sum(task.field_accuracy(s["prediction"], s["reference"])
             for s in samples) / len(samples)


def _curve(run_dir: str, key: str) -> list[tuple[int, float]]:
  records = sweep_summary.read_metrics(os.path.join(run_dir, sweep_summary.METRICS_NAME))
  return [(r["step"], r[key]) for r in records
          if isinstance(r.get(key), (int, float))]


def evaluate(root: str, sft_spec: str, size) -> dict:
  """Before (step-0 evaluation of the SFT runs) and after (their last)."""
  points = sweep.sweep_points(sft_spec, os.path.join(root, "sft"))
  # Every SFT point starts from the same model: its step-0 evaluation
  # (eval.on_start) is the "before" point.
  before = _start(points[0].workdir)
  after = []
  for point in points:
    row = {"share": point.overrides[SHARE_KEY], "run": point.name}
    row.update(_final(point.workdir))
    after.append(row)
  offset = size.cpt_steps
  curves = {}
  if size.cpt_steps:
    curves["cpt"] = _curve(os.path.join(root, "cpt"), METRICS["general_loss"])
  for point, row in zip(points, after):
    curves[f"sft share={row['share']:g}"] = [
        (offset + s, v)
        for s, v in _curve(point.workdir, METRICS["general_loss"])]
  return {"before": before, "after": after, "curves": curves,
          "size": {"cpt_steps": size.cpt_steps, "sft_steps": size.sft_steps,
                   "domain_eval": size.domain_eval}}


def markdown(results: dict) -> str:
  """The before/after table."""
  names = list(COLUMNS)
  lines = ["| model | general share | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]

  def row(label, share, values):
    cells = [f"{values[n]:.3f}" for n in names]
    return f"| {label} | {share} | " + " | ".join(cells) + " |"

  lines.append(row("before SFT" + (" (after CPT)" if results["size"][
      "cpt_steps"] else " (the base model)"), "-", results["before"]))
  for r in results["after"]:
    lines.append(row("after SFT", f"{r['share']:g}", r))
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str:
  """demo.png: task skill and forgetting against the general share."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  after, before = results["after"], results["before"]
  shares = [r["share"] for r in after]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))

  ax = axes[0]
  for name, color in (("exact_match", "tab:blue"),
                      ("field_accuracy", "tab:cyan"),
                      ("json_valid", "tab:green"),
                      ("domain_accuracy", "tab:orange")):
    ax.plot(shares, [r[name] for r in after], "o-", color=color,
            label=f"after SFT: {_LABELS[name]}")
    ax.axhline(before[name], color=color, ls="--", alpha=0.6,
               label=f"before SFT: {before[name]:.2f}")
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("share of general data in SFT")
  ax.set_title("Domain skill (higher is better)")
  ax.legend(fontsize=7)

  ax = axes[1]
  for name, color in (("general_loss", "tab:red"),
                      ("domain_loss", "tab:purple")):
    ax.plot(shares, [r[name] for r in after], "o-", color=color,
            label=f"after SFT: {_LABELS[name]}")
    ax.axhline(before[name], color=color, ls="--", alpha=0.6,
               label=f"before SFT: {before[name]:.2f}")
  ax.set_xlabel("share of general data in SFT")
  ax.set_title("Held-out loss (lower is better)")
  ax.legend(fontsize=7)

  ax = axes[2]
  for label, curve in results["curves"].items():
    if curve:
      ax.plot([s for s, _ in curve], [v for _, v in curve], "o-", ms=3,
              label=label)
  ax.axvline(results["size"]["cpt_steps"], color="gray", ls=":",
             label="SFT starts")
  ax.set_xlabel("training step (CPT, then SFT)")
  ax.set_title("General chat loss during training")
  ax.legend(fontsize=7)

  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_tensorboard(results: dict, logdir: str) -> str:
  """The summary as TensorBoard scalars: step = general share in percent."""
  from tensorboard.summary import Writer  # pylint: disable=g-import-not-at-top
  writer = Writer(logdir)
  for r in results["after"]:
    step = int(round(100 * r["share"]))
    for name in COLUMNS:
      writer.add_scalar(f"demo/after_sft/{name}", r[name], step=step)
      writer.add_scalar(f"demo/before_sft/{name}", results["before"][name],
                        step=step)
  writer.flush()
  writer.close()
  return logdir


def write(root: str, results: dict) -> dict[str, str]:
  """results.json, results.md, demo.png and a TensorBoard run under root."""
  files = {"json": os.path.join(root, "results.json"),
           "md": os.path.join(root, "results.md"),
           "png": os.path.join(root, "demo.png"),
           "tb": os.path.join(root, "tb_summary")}
  with open(files["json"], "w") as f:
    json.dump(results, f, indent=1)
  with open(files["md"], "w") as f:
    f.write(markdown(results))
  plot(results, files["png"])
  write_tensorboard(results, files["tb"])
  return files


def how_to_read(root: str, files: dict[str, str]) -> str:
  return f"""\
Plot: {files['png']}
  left    held-out task: exact match, fields right and JSON validity of
          greedy answers, and next-token accuracy on the reference answers,
          against the share of general chat mixed into SFT; dashed = before SFT.
  middle  held-out losses: task answers (purple) and general chat (red);
          dashed = before SFT.
  right   general chat loss over SFT: it falls only where general chat is
          mixed in (with continued pretraining, cpt_steps > 0, it falls
          first, then rises during SFT).
Table: {files['md']}   numbers: {files['json']}
Sweep summary (final and best of every metric): {root}/sft/summary.md
TensorBoard: tensorboard --logdir {root}
  Scalars: train/loss, eval/general/loss, eval/domain/loss, eval/gen/* per run
  (sft/<point>/tb, and cpt/tb with continued pretraining); HParams: the sweep points side by side;
  tb_summary: demo/after_sft/* and demo/before_sft/* against the general share
  in percent (the x axis "step" = 0, 25, 50)."""
