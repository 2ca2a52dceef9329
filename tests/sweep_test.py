"""Tests for sft_jax/sweep.py: points, names, resume/skip, dry run, summary.

Most tests inject a fake trainer (a small script written to tmp_path) as the
train command, so the runner's process handling, skip/resume logic and summary
are checked in well under a second per run; one test trains the real tiny
config end to end.
"""

import csv
import io
import json
import os
import shlex
import sys
import textwrap

import pytest

from sft_jax import sweep
from sft_jax import sweep_summary

# Writes one metrics line per step to WORKDIR/metrics.jsonl, continuing after
# the last step already there (as train resumes from its checkpoint). The loss
# depends on the overrides, so the summary can be checked against it. If the
# file named by $FAKE_FAIL_FLAG exists and --config.fail_at=K is given, the
# first attempt exits with code 3 after step K (and removes the flag).
_FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    args = sys.argv[1:]
    workdir = args[args.index("--workdir") + 1]
    config = args[args.index("--config") + 1]
    over = dict(a[len("--config."):].split("=", 1)
                for a in args if a.startswith("--config."))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(os.path.dirname(workdir), "calls.txt"), "a") as f:
      f.write(os.path.basename(workdir) + " " + config + "\\n")
    path = os.path.join(workdir, "metrics.jsonl")
    start = 0
    if os.path.exists(path):
      start = max(json.loads(l)["step"] for l in open(path) if l.strip())
      print("resuming from step", start)
    w = float(over.get("data.sources.general.weight", 0))
    lr = float(over.get("optim.lr", 1))
    steps = int(over.get("train.steps", 4))
    flag = os.environ.get("FAKE_FAIL_FLAG", "")
    fail_at = int(over.get("fail_at", -1))
    with open(path, "a") as f:
      for step in range(start + 1, steps + 1):
        rec = {"step": step, "loss": lr * (1 + w) / step}
        if step % 2 == 0:
          rec["eval/domain/loss"] = 10 * w + step
          rec["eval/exact_match"] = (1 - w) * step / steps
        f.write(json.dumps(rec) + "\\n")
        f.flush()
        if step == fail_at and flag and os.path.exists(flag):
          os.remove(flag)
          print("simulated crash at step", step)
          sys.exit(3)
    print("trained", workdir, "to step", steps)
""")

_EXPERIMENT = textwrap.dedent("""
    from sft_jax import sweep

    SUMMARY_METRICS = ("loss", "eval/domain/loss", "eval/exact_match")

    def get_config(arg=None):
      return {"arg": arg}

    def get_sweep(arg=None):
      points = sweep.grid({"data.sources.general.weight": [0.0, 0.5],
                           "optim.lr": [1.0, 2.0]})
      if arg == "fail":
        points[1]["fail_at"] = 2
      return points
""")


@pytest.fixture
def fake(tmp_path):
  """(experiment path, train command) using the fake trainer."""
  train = tmp_path / "fake_train.py"
  train.write_text(_FAKE_TRAIN)
  exp = tmp_path / "exp.py"
  exp.write_text(_EXPERIMENT)
  return str(exp), [sys.executable, str(train)]


def _calls(workdir):
  path = os.path.join(workdir, "calls.txt")
  if not os.path.exists(path):
    return []
  return [l.split()[0] for l in open(path).read().splitlines()]


def test_grid_is_the_cartesian_product_first_key_slowest():
  assert sweep.grid({"a": [1, 2], "b.c": ["x", "y"]}) == [
      {"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"},
      {"a": 2, "b.c": "x"}, {"a": 2, "b.c": "y"}]
  with pytest.raises(sweep.SweepError, match="'a'"):
    sweep.grid({"a": []})


def test_run_names_shorten_keys_but_keep_them_apart():
  points = [{"data.sources.general.weight": 0.25,
             "data.sources.domain.weight": 0.75, "optim.lr": 3e-4},
            {"data.sources.general.weight": 0.5,
             "data.sources.domain.weight": 0.5, "optim.lr": 1e-3}]
  assert sweep.run_names(points) == [
      "general.weight=0.25,domain.weight=0.75,lr=0.0003",
      "general.weight=0.5,domain.weight=0.5,lr=0.001"]
  assert sweep.run_names([{}]) == ["default"]
  assert sweep.run_names([{"model.path": "meta/llama 3"}]) == [
      "path=meta-llama-3"]
  with pytest.raises(sweep.SweepError, match="both map to run name"):
    sweep.run_names([{"a.x": 1}, {"a.x": 1}])


def test_point_command_formats_values_for_the_train_cli():
  point = sweep.Point("n", {"optim.lr": 3e-4, "train.steps": 10,
                            "model.lora.enabled": True, "data.mask": "last"},
                      "w/n")
  assert point.command("exp.py:a", ["train"], ["--x"]) == [
      "train", "--config", "exp.py:a", "--workdir", "w/n",
      "--config.optim.lr=0.0003", "--config.train.steps=10",
      "--config.model.lora.enabled=true", "--config.data.mask=last", "--x"]


def test_dry_run_prints_one_command_per_unfinished_point(fake, tmp_path,
                                                          capsys):
  exp, train = fake
  workdir = str(tmp_path / "sw")
  assert sweep.run_sweep(exp, workdir, dry_run=True, train_command=train) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  names = sweep.run_names(sweep.grid({"data.sources.general.weight": [0.0, .5],
                                      "optim.lr": [1.0, 2.0]}))
  for line, name in zip(lines, names):
    argv = shlex.split(line)
    assert argv[:2] == train
    assert argv[argv.index("--workdir") + 1] == os.path.join(workdir, name)
  assert "--config.data.sources.general.weight=0.5" in lines[3]
  assert not os.path.exists(workdir)  # a dry run creates nothing
  # Once a point is finished, the dry run leaves it out.
  os.makedirs(os.path.join(workdir, names[0]))
  open(os.path.join(workdir, names[0], sweep.DONE_MARKER), "w").write("{}")
  sweep.run_sweep(exp, workdir, dry_run=True, train_command=train)
  captured = capsys.readouterr()
  assert len(captured.out.strip().splitlines()) == 3
  assert names[0] not in captured.out and "already finished" in captured.err


def test_partial_sweep_resumes_unfinished_and_skips_finished(
    fake, tmp_path, monkeypatch):
  exp, train = fake
  workdir = str(tmp_path / "sw")
  flag = tmp_path / "fail_once"
  flag.write_text("")
  monkeypatch.setenv("FAKE_FAIL_FLAG", str(flag))
  names = [p.name for p in sweep.sweep_points(exp + ":fail", workdir)]

  # First pass: point 1 crashes after step 2; the others finish.
  assert sweep.run_sweep(exp + ":fail", workdir, train_command=train) == 1
  done = [os.path.exists(os.path.join(workdir, n, sweep.DONE_MARKER))
          for n in names]
  assert done == [True, False, True, True]
  assert sorted(_calls(workdir)) == sorted(names)
  summary = open(os.path.join(workdir, "summary.csv")).read()
  assert list(csv.DictReader(io.StringIO(summary)))[1]["status"] == (
      "unfinished")

  # Second pass: only the crashed point runs again, continuing at step 3.
  assert sweep.run_sweep(exp + ":fail", workdir, train_command=train) == 0
  assert _calls(workdir)[4:] == [names[1]]
  assert "resuming from step 2" in open(
      os.path.join(workdir, names[1], sweep.LOG_NAME)).read()
  steps = [json.loads(l)["step"] for l in open(
      os.path.join(workdir, names[1], "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]
  marker = json.load(open(os.path.join(workdir, names[1], sweep.DONE_MARKER)))
  assert marker["overrides"] == {"data.sources.general.weight": 0.0,
                                 "optim.lr": 2.0, "fail_at": 2}

  # Third pass: everything finished, nothing runs.
  assert sweep.run_sweep(exp + ":fail", workdir, train_command=train) == 0
  assert len(_calls(workdir)) == 5


def test_parallel_runs_every_point_once(fake, tmp_path):
  exp, train = fake
  workdir = str(tmp_path / "sw")
  assert sweep.run_sweep(exp, workdir, parallel=3, train_command=train,
                         extra_args=["--config.train.steps=6"]) == 0
  points = sweep.sweep_points(exp, workdir)
  assert sorted(_calls(workdir)) == sorted(p.name for p in points)
  for p in points:
    assert p.done
    lines = open(os.path.join(p.workdir, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 6  # the extra argument reached every point


def test_summary_reads_final_and_best_from_known_metrics(tmp_path):
  points = [sweep.Point("w=0", {"w": 0.0}, str(tmp_path / "a")),
            sweep.Point("w=0.5", {"w": 0.5}, str(tmp_path / "b")),
            sweep.Point("w=1", {"w": 1.0}, str(tmp_path / "c"))]
  os.makedirs(points[0].workdir)
  with open(os.path.join(points[0].workdir, "metrics.jsonl"), "w") as f:
    for rec in [{"step": 1, "loss": 3.0},
                {"step": 2, "loss": 2.0, "eval": {"acc": 0.5}},
                {"step": 3, "loss": 2.5, "eval": {"acc": 0.25}}]:
      f.write(json.dumps(rec) + "\n")
  open(os.path.join(points[0].workdir, sweep.DONE_MARKER), "w").write("{}")
  os.makedirs(points[1].workdir)
  with open(os.path.join(points[1].workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    f.write('{"step": 2, "lo')  # killed mid-write
  summary = sweep_summary.summarize(points)
  assert summary.metrics == ["loss", "eval/acc"]
  assert summary.status == ["done", "unfinished", "not started"]
  assert summary.steps == [3, 1, None]
  s = summary.stats[0]
  assert (s["loss"].final, s["loss"].best, s["loss"].best_step) == (2.5, 2.0, 2)
  # Accuracy: higher is better.
  assert (s["eval/acc"].final, s["eval/acc"].best,
          s["eval/acc"].best_step) == (0.25, 0.5, 2)
  assert summary.csv().splitlines() == [
      "run,w,status,step,loss final,loss best,loss best step,"
      "eval/acc final,eval/acc best,eval/acc best step",
      "w=0,0.0,done,3,2.5,2.0,2,0.25,0.5,2",
      "w=0.5,0.5,unfinished,1,4.0,4.0,1,,,",
      "w=1,1.0,not started,,,,,,,"]
  md = summary.markdown().splitlines()
  assert md[0] == ("| run | w | status | step | loss final | loss best | "
                   "eval/acc final | eval/acc best |")
  assert md[2] == "| w=0 | 0 | done | 3 | 2.5 | 2 | 0.25 | 0.5 |"
  paths = sweep_summary.write_summary(summary, str(tmp_path))
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_summary_matches_the_fake_trainer(fake, tmp_path, capsys):
  exp, train = fake
  workdir = str(tmp_path / "sw")
  assert sweep.run_sweep(exp, workdir, train_command=train) == 0
  rows = list(csv.DictReader(open(os.path.join(workdir, "summary.csv"))))
  assert len(rows) == 4
  for row in rows:
    w, lr = float(row["data.sources.general.weight"]), float(row["optim.lr"])
    assert row["status"] == "done" and row["step"] == "4"
    assert float(row["loss final"]) == pytest.approx(lr * (1 + w) / 4)
    assert float(row["loss best"]) == pytest.approx(lr * (1 + w) / 4)
    assert float(row["eval/domain/loss best"]) == pytest.approx(10 * w + 2)
    assert float(row["eval/exact_match best"]) == pytest.approx(1 - w)
  # SUMMARY_METRICS from the experiment chose the columns.
  assert list(rows[0])[5:] == [
      f"{m} {c}" for m in ("loss", "eval/domain/loss", "eval/exact_match")
      for c in ("final", "best", "best step")]
  assert os.path.exists(os.path.join(workdir, "summary.png"))
  assert "| run |" in capsys.readouterr().out


def test_bad_input_gives_clear_errors(fake, tmp_path):
  exp, train = fake
  bad = tmp_path / "m.jsonl"
  bad.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(sweep.SweepError, match=r"m.jsonl:2: malformed"):
    sweep_summary.read_metrics(str(bad))
  with pytest.raises(sweep.SweepError, match="needs a get_sweep"):
    (tmp_path / "e.py").write_text("def get_config(arg=None):\n  return 1\n")
    sweep.load_experiment(str(tmp_path / "e.py"))
  with pytest.raises(sweep.SweepError, match="no such points"):
    sweep.run_sweep(exp, str(tmp_path / "w"), only=["nope"],
                    train_command=train)

  def reject(spec, overrides):
    if any("optim.lr=2.0" in o for o in overrides):
      raise KeyError("optim.lr out of range")
  with pytest.raises(sweep.SweepError, match=r"point .*lr=2.*optim.lr out"):
    sweep.run_sweep(exp, str(tmp_path / "w"), check_config=reject,
                    train_command=train)
  assert not os.path.exists(tmp_path / "w")  # nothing ran
  # Through the command dispatcher: one line, exit code 2.
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["sweep", str(tmp_path / "missing.py"), "--workdir",
                   "w"]) == 2


def test_real_tiny_training_sweep(tmp_path):
  """Two points of configs/tiny.py trained by the real `sft-jax train`."""
  import tiny_tok  # pylint: disable=g-import-not-at-top
  tiny_tok.make_tokenizer(tmp_path / "tok")
  with open(tmp_path / "train.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"messages": [
          {"role": "user", "content": f"what is {i} plus two?"},
          {"role": "assistant", "content": f"It is {i + 2}."}]}) + "\n")
  exp = tmp_path / "tiny_exp.py"
  exp.write_text(textwrap.dedent(f"""
      from sft_jax.train import config as config_lib

      def get_config(arg=None):
        c = config_lib.get_config_from_file(
            "configs/tiny.py:data={tmp_path / 'train.jsonl'},"
            "tokenizer={tmp_path / 'tok'},steps=3")
        c.log.every_steps = 1
        c.data.cache_dir = "{tmp_path / 'cache'}"
        return c

      def get_sweep(arg=None):
        return [{{"optim.lr": 1e-3}}, {{"optim.lr": 3e-3}}]
  """))
  workdir = str(tmp_path / "sw")
  assert sweep.run_sweep(str(exp), workdir, parallel=2,
                         check_config=sweep._check_with_train_config) == 0
  points = sweep.sweep_points(str(exp), workdir)
  rows = list(csv.DictReader(open(os.path.join(workdir, "summary.csv"))))
  for point, row in zip(points, rows):
    assert point.done and row["status"] == "done" and row["step"] == "3"
    resolved = json.load(open(os.path.join(point.workdir, "config.json")))
    assert resolved["optim"]["lr"] == point.overrides["optim.lr"]
    losses = [r["train/loss"] for r in sweep_summary.read_metrics(
        os.path.join(point.workdir, "metrics.jsonl")) if "train/loss" in r]
    assert len(losses) == 3
    assert float(row["train/loss final"]) == pytest.approx(losses[-1])
    assert float(row["train/loss best"]) == pytest.approx(min(losses))
  # TensorBoard HParams: the sweep's experiment lists the swept key first
  # (marked as differing) and the metrics in the summary's order; each run's
  # session is named by its run name.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top

  def hparams_content(logdir):
    acc = event_accumulator.EventAccumulator(logdir)
    acc.Reload()
    return [plugin_data_pb2.HParamsPluginData.FromString(c)
            for c in acc.PluginTagToContent("hparams").values()]

  [exp_data] = hparams_content(os.path.join(workdir, "tb_hparams"))
  infos = exp_data.experiment.hparam_infos
  assert infos[0].name == "optim.lr" and infos[0].differs
  assert not any(i.differs for i in infos[1:]) and len(infos) > 50
  assert [m.name.tag for m in exp_data.experiment.metric_infos] == ["train/loss"]
  for point in points:
    [start] = hparams_content(os.path.join(point.workdir, "tb"))
    assert start.session_start_info.group_name == point.name
    assert start.session_start_info.hparams["optim.lr"].number_value == (
        pytest.approx(point.overrides["optim.lr"]))
  # Re-running trains nothing: every point is finished.
  mtimes = [os.path.getmtime(os.path.join(p.workdir, "metrics.jsonl"))
            for p in points]
  assert sweep.run_sweep(str(exp), workdir) == 0
  assert mtimes == [os.path.getmtime(os.path.join(p.workdir, "metrics.jsonl"))
                    for p in points]


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(p) for p in __import__("glob").glob(os.path.join(
        os.path.dirname(__file__), "..", "experiments", "*.py"))))
def test_every_experiment_builds_and_its_points_are_valid_overrides(path):
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  points = sweep.sweep_points(path, "w")
  assert len(points) >= 2
  for p in points:
    cfg = config_lib.load_config(path, [
        f"--config.{k}={sweep._format_value(v)}"
        for k, v in p.overrides.items()])
    for key, value in p.overrides.items():
      node = cfg
      for part in key.split("."):
        node = node[part]
      assert node == pytest.approx(value)


def test_plot_draws_co_varying_keys_as_one_line():
  mk = lambda s, lr: sweep.Point("p", {"g.weight": s, "d.weight": 1 - s,
                                       "lr": lr}, "w")
  points = [mk(s, lr) for lr in (1e-3, 2e-3) for s in (0.0, 0.5)]
  assert sweep_summary._follows(points, "g.weight", "d.weight")
  assert not sweep_summary._follows(points, "g.weight", "lr")
  summary = sweep_summary.Summary(points, ["done"] * 4, [1] * 4,
                                  [{} for _ in points], [])
  assert sweep_summary.varying_keys(summary) == ["g.weight", "d.weight", "lr"]
  assert sweep_summary.varying_keys(sweep_summary.Summary(
      points[:2], ["done"] * 2, [1] * 2, [{}, {}], [])) == [
          "g.weight", "d.weight"]
