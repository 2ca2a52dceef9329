"""`sft-jax sweep`: run every point of an experiment's sweep, then summarise.

An experiment is a Python file with `get_config(arg=None)` (a train config,
usually forking configs/base.py) and `get_sweep(arg=None)` returning a list of
points, each a dict of config overrides `{"data.sources.general.weight": 0.25}`.
`grid()` builds the cartesian product of a few axes; a plain list works too.

Each point runs as its own process,

  python -m sft_jax train --config EXP.py[:arg] --workdir DIR/<run-name> \
      --config.KEY=VALUE ...

so it has its own run directory (resolved config, checkpoints, metrics.jsonl,
TensorBoard events with the point's hyperparameters for the HParams view).
When a point's process exits cleanly the runner writes `DIR/<run-name>/
sweep_done.json`; re-running the sweep skips those points and re-launches the
others, which resume from their own checkpoints. At the end it writes
`DIR/summary.md`, `DIR/summary.csv` (final and best value of each chosen metric
per point, read from each run's metrics.jsonl) and `DIR/summary.png` (the final
values against the swept key); see sft_jax/sweep_summary.py.
"""

import argparse
import dataclasses
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

from sft_jax import sweep_runner
from sft_jax import sweep_summary
from sft_jax.sweep_summary import SweepError, summarize, write_summary

DONE_MARKER = sweep_runner.DONE_MARKER
LOG_NAME = sweep_runner.LOG_NAME
TRAIN_COMMAND = sweep_runner.TRAIN_COMMAND



# ----------------------------------------------------------------- points


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The cartesian product of `axes` (key -> values), first key slowest.

  grid({"optim.lr": [1e-4, 3e-4], "seed": [0, 1]}) has four points.
  """
  keys = list(axes)
  for key in keys:
    if isinstance(axes[key], (str, bytes)) or not len(axes[key]):
      raise SweepError(f"grid axis {key!r} needs a non-empty list of values")
  return [dict(zip(keys, values))
          for values in itertools.product(*(axes[k] for k in keys))]


def _format_value(value: Any) -> str:
  """How a value is written on the train command line."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return ",".join(_format_value(v) for v in value)
  return str(value)


def _name_value(value: Any) -> str:
  if isinstance(value, float):
    text = f"{value:g}"
  else:
    text = _format_value(value)
  return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def run_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
  """Directory names for `points`, e.g. "weight=0.25,lr=0.0003".

  Each key is shortened to its last dotted component, or as many trailing
  components as needed to tell apart keys that share it; a point with no
  overrides is "default". Raises SweepError if two points get the same name.
  """
  keys = list(dict.fromkeys(k for p in points for k in p))
  short = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      cand = ".".join(parts[-n:])
      clash = [k for k in keys if k != key and
               (k == cand or k.endswith("." + cand))]
      if not clash:
        break
    short[key] = cand
  names = []
  for point in points:
    names.append(",".join(f"{short[k]}={_name_value(v)}"
                          for k, v in point.items()) or "default")
  seen = {}
  for i, name in enumerate(names):
    if name in seen:
      raise SweepError(f"sweep points {seen[name]} and {i} both map to run "
                       f"name {name!r}: {points[seen[name]]} vs {points[i]}")
    seen[name] = i
  return names


@dataclasses.dataclass(frozen=True)
class Point:
  """One sweep point: its run name, overrides and run directory."""
  name: str
  overrides: dict[str, Any]
  workdir: str

  def command(self, config_spec: str, train_command: Sequence[str],
              extra_args: Sequence[str] = ()) -> list[str]:
    """The train command line that runs this point."""
    return [*train_command, "--config", config_spec, "--workdir", self.workdir,
            *(f"--config.{k}={_format_value(v)}"
              for k, v in self.overrides.items()), *extra_args]

  @property
  def done(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, DONE_MARKER))


def _split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_experiment(spec: str):
  """Imports the experiment file of `spec` ("path.py" or "path.py:arg")."""
  path, _ = _split_spec(spec)
  if not os.path.isfile(path):
    raise SweepError(f"{spec}: experiment file {path!r} not found")
  name = "sft_jax_experiment_" + re.sub(
      r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for func in ("get_config", "get_sweep"):
    if not callable(getattr(module, func, None)):
      raise SweepError(f"{path}: an experiment file needs a {func}() function")
  return module


def sweep_points(spec: str, workdir: str, module=None) -> list[Point]:
  """The points of experiment `spec`, with run directories under `workdir`."""
  module = module or load_experiment(spec)
  _, arg = _split_spec(spec)
  get_sweep = module.get_sweep
  raw = get_sweep(arg) if inspect.signature(get_sweep).parameters else (
      get_sweep())
  raw = list(raw)
  if not raw:
    raise SweepError(f"{spec}: get_sweep() returned no points")
  for i, point in enumerate(raw):
    if not isinstance(point, Mapping) or not all(
        isinstance(k, str) and k for k in point):
      raise SweepError(f"{spec}: sweep point {i} must be a dict of config "
                       f"keys to values, got {point!r}")
  points = [dict(p) for p in raw]
  return [Point(name, p, os.path.join(workdir, name))
          for name, p in zip(run_names(points), points)]


# ------------------------------------------------------------------ running

run_points = sweep_runner.run_points


def _write_hparams_experiment(summary, workdir: str) -> None:
  """TensorBoard HParams for the sweep: swept keys and eval metrics first."""
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  hparams = {}
  for p in summary.points:
    path = os.path.join(p.workdir, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        hparams = config_lib.flatten_config(
            config_lib.config_from_dict(json.load(f)))
      break
  if not hparams:
    return
  metrics = sorted(summary.metrics, key=lambda m: not m.startswith("eval"))
  metrics_writer.write_experiment(
      os.path.join(workdir, "tb_hparams"), hparams,
      sweep_summary.varying_keys(summary), metrics)


def run_sweep(spec: str, workdir: str, *, parallel: int = 1,
              dry_run: bool = False, summary_only: bool = False,
              list_points: bool = False,
              only: Sequence[str] = (), index: int | None = None,
              metrics: Sequence[str] | None = None,
              x: str | None = None, extra_args: Sequence[str] = (),
              train_command: Sequence[str] = TRAIN_COMMAND,
              check_config: Callable[[str, list[str]], Any] | None = None,
              env: Mapping[str, str] | None = None) -> int:
  """The whole `sft-jax sweep`; returns the process exit code.

  train_command: the command prefix that trains one point (tests inject a fake
    trainer here). check_config(spec, overrides) is called for every point
    before anything runs, so a misspelt key fails the sweep up front.
  """
  module = load_experiment(spec)
  points = all_points = sweep_points(spec, workdir, module)
  if list_points:
    for i, p in enumerate(points):
      print(f"{i}\t{p.name}\t{json.dumps(p.overrides)}")
    return 0
  if only:
    unknown = sorted(set(only) - {p.name for p in points})
    if unknown:
      raise SweepError(f"--only: no such points {unknown}; points are "
                       f"{[p.name for p in points]}")
    points = [p for p in points if p.name in only]
  if index is not None:
    if not 0 <= index < len(points):
      raise SweepError(f"--index {index}: the sweep has {len(points)} points "
                       f"(0..{len(points) - 1})")
    points = [points[index]]
  if metrics is None:
    metrics = getattr(module, "SUMMARY_METRICS", None)
  if check_config is not None:
    for p in points:
      overrides = [f"--config.{k}={_format_value(v)}"
                   for k, v in p.overrides.items()]
      overrides += [a for a in extra_args if a.startswith("--config.")]
      try:
        check_config(spec, overrides)
      except Exception as e:  # pylint: disable=broad-except
        raise SweepError(f"point {p.name}: the config rejects its overrides: "
                         f"{type(e).__name__}: {e}") from e
  if dry_run:
    for p in points:
      if p.done:
        print(f"# {p.name}: already finished", file=sys.stderr)
      else:
        print(shlex.join(p.command(spec, train_command, extra_args)))
    return 0
  results = {}
  if not summary_only:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      json.dump({"experiment": spec, "extra_args": list(extra_args),
                 "points": [{"name": p.name, "overrides": p.overrides}
                            for p in all_points]}, f, indent=1)
    results = run_points(points, spec, parallel=parallel,
                         train_command=train_command, extra_args=extra_args,
                         env=env)
  # The summary covers the whole sweep, also when only some points ran here.
  summary = summarize(all_points, metrics)
  os.makedirs(workdir, exist_ok=True)
  paths = write_summary(summary, workdir, x=x)
  _write_hparams_experiment(summary, workdir)
  print(summary.markdown())
  for kind, path in paths.items():
    print(f"[sweep] summary {kind}: {path}")
  failed = [n for n, rc in results.items() if rc != 0]
  if failed:
    print(f"[sweep] {len(failed)} point(s) failed: {failed}", file=sys.stderr)
    return 1
  return 0


def _check_with_train_config(spec: str, overrides: list[str]):
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import validate  # pylint: disable=g-import-not-at-top
  # Values only: the points may train on another machine, with other files.
  validate.validate(config_lib.load_config(spec, overrides=overrides),
                    sources=False)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="sft-jax sweep",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=(
          "Run every point of an experiment's sweep as its own training run,\n"
          "then write a summary table and plot.\n\n"
          "EXP.py defines get_config(arg=None) and get_sweep(arg=None); each\n"
          "point of get_sweep() (a dict of config overrides) trains in\n"
          "DIR/<run-name>/. Finished points (DIR/<run>/sweep_done.json) are\n"
          "skipped; unfinished ones are re-launched and resume from their\n"
          "checkpoints. Results: DIR/summary.{md,csv,png}; compare runs with\n"
          "`tensorboard --logdir DIR` (HParams tab)."),
      epilog=(
          "examples:\n"
          "  sft-jax sweep experiments/qwen25_7b_full_mix.py --workdir "
          "runs/q7b_mix\n"
          "  sft-jax sweep experiments/llama31_8b_lora_mix.py --workdir W "
          "--dry-run\n"
          "  sft-jax sweep EXP.py --workdir W -- --config.train.steps=20"))
  p.add_argument("experiment", metavar="EXP.py[:ARG]",
                 help="experiment file, optionally with the arg passed to "
                      "get_config/get_sweep")
  p.add_argument("--workdir", required=True,
                 help="sweep directory; each point runs in WORKDIR/<run-name>")
  p.add_argument("--parallel", type=int, default=1, metavar="N",
                 help="points to train at once (default 1: in sequence, "
                      "output on the console; N>1: output only in each run's "
                      "sweep.log)")
  p.add_argument("--dry-run", action="store_true",
                 help="print one train command per unfinished point (for a "
                      "cluster scheduler) and exit")
  p.add_argument("--summary-only", action="store_true",
                 help="run nothing; re-read the runs' metrics and rewrite the "
                      "summary (e.g. after running the --dry-run commands "
                      "elsewhere)")
  p.add_argument("--only", action="append", default=[], metavar="RUN",
                 help="run only this point (by run name; repeatable)")
  p.add_argument("--index", type=int, default=None, metavar="I",
                 help="run only the I-th point (0-based; e.g. a SLURM array "
                      "task's $SLURM_ARRAY_TASK_ID)")
  p.add_argument("--list", action="store_true",
                 help="print the points (index, run name, overrides) and exit")
  p.add_argument("--metrics", default=None,
                 help="comma-separated metrics for the table and plot "
                      "(default: the experiment's SUMMARY_METRICS, else the "
                      "train loss and every eval metric)")
  p.add_argument("--x", default=None,
                 help="swept key for the plot's x axis (default: the first "
                      "key that varies)")
  p.add_argument("--no-check", action="store_true",
                 help="do not validate every point's overrides against the "
                      "config before launching")
  p.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS",
                 help="extra arguments appended to every train command, "
                      "after `--`")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after `--` goes to train verbatim: argparse would read
  # `--config.train.steps=20` there as an unknown option of its own.
  train_args = []
  if "--" in argv:
    split = argv.index("--")
    argv, train_args = argv[:split], argv[split + 1:]
  args = _parser().parse_args(argv)
  args.train_args = list(args.train_args) + train_args
  return run_sweep(
      args.experiment, args.workdir, parallel=args.parallel,
      dry_run=args.dry_run, summary_only=args.summary_only, only=args.only,
      index=args.index, list_points=args.list,
      metrics=args.metrics.split(",") if args.metrics else None, x=args.x,
      extra_args=args.train_args,
      check_config=None if args.no_check else _check_with_train_config)
