"""Resume refuses what would silently continue another run (sft_jax/train/
resume.py), through the `sft-jax train` dispatcher, in process.

One short LoRA run on a tiny pretrained base; then each refused resume is a
single line and exit code 2 before anything is loaded, and the run is left as
it was; a longer `train.steps` needs an explicit schedule choice, and `keep`
continues the original learning-rate schedule exactly.
"""

import json
import shutil

import pytest

import tiny_hf
import tiny_tok
from sft_jax import cli
from sft_jax import errors

_STEPS = 3
# No warmup and a non-zero final lr, so the schedule choices differ in value.
_SCHEDULE = ("--config.optim.warmup_steps=0", "--config.optim.end_lr_ratio=0.1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = tmp_path_factory.mktemp("resume")
  tiny_tok.make_tokenizer(d / "tok")
  tiny_tok.make_tokenizer(d / "tok_other", chat_template=tiny_tok.LLAMA3)
  # Two bases of the same shapes (the tiny config's), different weights.
  for name, seed in (("base", 0), ("other_base", 1)):
    tiny_hf.make_tiny_hf("qwen2", d / name, seed=seed, vocab_size=320,
                         hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512)
  with open(d / "train.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"messages": [
          {"role": "user", "content": f"count to {i % 7}"},
          {"role": "assistant",
           "content": " ".join(map(str, range(1 + i % 7)))}
      ]}) + "\n")
  workdir = d / "run"
  rc = cli.main(_argv(d, workdir))
  assert rc == 0
  return d, workdir


def _argv(d, workdir, *extra, base="base", tok="tok", steps=_STEPS):
  return ["train", "--config",
          f"configs/tiny.py:model={d / base},data={d / 'train.jsonl'},"
          f"tokenizer={d / tok},method=lora,steps={steps}",
          "--workdir", str(workdir), "--no-progress",
          "--config.log.every_steps=1", "--config.checkpoint.every_steps=0",
          "--config.checkpoint.async_save=false", *_SCHEDULE, *extra]


def _refused(capsys, argv, *needles):
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  assert rc == errors.EXIT_USAGE, (out[-2000:], err[-2000:])
  assert "Traceback" not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith("sft-jax train: resume: "), err
  for needle in needles:
    assert needle in line, line
  return line


def _lr_by_step(workdir):
  out = {}
  for line in open(workdir / "metrics.jsonl"):
    r = json.loads(line)
    if "train/lr" in r:
      assert r["step"] not in out, f"step {r['step']} logged twice"
      out[r["step"]] = r["train/lr"]
  return out


def test_refuses_another_base_tokenizer_or_lora_shape(run, capsys):
  d, workdir = run
  before = [(workdir / f).read_text() for f in ("metrics.jsonl",
                                                "config.json")]
  more = dict(steps=_STEPS + 2)  # a resume that would train
  keep = ("--schedule-on-resume", "keep")
  _refused(capsys, _argv(d, workdir, *keep, base="other_base", **more),
           f"model.path was '{d / 'base'}', now '{d / 'other_base'}'",
           "--allow-resume-change")
  _refused(capsys, _argv(d, workdir, *keep, tok="tok_other", **more),
           "data.tokenizer was")
  _refused(capsys, _argv(d, workdir, *keep, "--config.method.lora.rank=8",
                         **more),
           "method.lora.rank was 4, now 8")
  # The same path with other weights in it (a re-download, a new revision).
  moved = d / "base_moved"
  shutil.copytree(d / "base", moved)
  try:
    shutil.copy(d / "other_base" / "model.safetensors",
                d / "base" / "model.safetensors")
    _refused(capsys, _argv(d, workdir, *keep, **more),
             "the base model's content changed")
  finally:
    shutil.copy(moved / "model.safetensors", d / "base" / "model.safetensors")
  assert [(workdir / f).read_text()
          for f in ("metrics.jsonl", "config.json")] == before
  # The same content under another path is the same base: no refusal.
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import resume  # pylint: disable=g-import-not-at-top
  argv = _argv(d, workdir, base="base_moved")
  cfg = config_lib.load_config(argv[2], argv[6:])
  lines = []
  resume.check(cfg, str(workdir), _STEPS, allow_change=False,
               schedule_choice=None, write=lines.append)
  assert lines == [f"  config model.path: '{d / 'base'}' -> "
                   f"'{d / 'base_moved'}'"]


def test_longer_steps_need_an_explicit_schedule_choice(run, capsys):
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import optim  # pylint: disable=g-import-not-at-top
  d, workdir = run
  cfg = config_lib.load_config(
      f"configs/tiny.py:method=lora,steps={_STEPS}", _SCHEDULE)
  sched = {"kept": optim.schedule(cfg.optim, _STEPS),
           "stretched": optim.schedule(cfg.optim, _STEPS + 2),
           "restarted": optim.schedule(cfg.optim, _STEPS + 2, start=_STEPS)}
  lr = {k: [float(f(c)) for c in range(_STEPS + 2)] for k, f in sched.items()}
  # The three choices differ from the first step after the resume on.
  assert len({round(v[_STEPS], 12) for v in lr.values()}) == 3, lr
  line = _refused(capsys, _argv(d, workdir, steps=_STEPS + 2),
                  f"train.steps: was {_STEPS}, now {_STEPS + 2}",
                  "--schedule-on-resume keep")
  assert (f"lr of step {_STEPS + 1}: {lr['kept'][_STEPS]:.3e} kept, "
          f"{lr['stretched'][_STEPS]:.3e} stretched, "
          f"{lr['restarted'][_STEPS]:.3e} restarted") in line

  # The lr logged at step s is the schedule's value at s - 1 (the update of
  # step s is the optimizer's (s-1)-th).
  logged = _lr_by_step(workdir)
  for s in range(1, _STEPS + 1):
    assert logged[s] == pytest.approx(lr["kept"][s - 1], rel=1e-6)
  for choice, name, key in (("keep", "kept", "schedule_steps"),
                            ("restart", "restarted", "schedule_start")):
    resumed = d / name
    shutil.copytree(workdir, resumed)
    rc = cli.main(_argv(d, resumed, "--schedule-on-resume", choice,
                        steps=_STEPS + 2))
    out = capsys.readouterr().out
    assert rc == 0
    assert f"schedule {name}" in out
    logged = _lr_by_step(resumed)  # also: each step logged once
    assert sorted(logged) == list(range(1, _STEPS + 3))
    for s in range(_STEPS + 1, _STEPS + 3):
      assert logged[s] == pytest.approx(lr[name][s - 1], rel=1e-6), (choice, s)
    saved = json.loads((resumed / "config.json").read_text())
    assert saved["optim"][key] == _STEPS


def test_allowed_change_onto_other_shapes_is_still_one_line(run, capsys):
  d, workdir = run
  if not (d / "wide_base").exists():
    tiny_hf.make_tiny_hf("qwen2", d / "wide_base", vocab_size=320,
                         hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512)
  before = [(workdir / f).read_text() for f in ("metrics.jsonl",
                                                "config.json")]
  line = _refused(capsys, _argv(d, workdir, "--allow-resume-change",
                                "--schedule-on-resume", "keep",
                                base="wide_base", steps=_STEPS + 2),
                  "does not fit the configured model")
  assert f"{workdir / 'checkpoints'}/{_STEPS}" in line
  # The failed resume left the run as it was: the next resume compares
  # against the run's own config.
  assert [(workdir / f).read_text()
          for f in ("metrics.jsonl", "config.json")] == before
