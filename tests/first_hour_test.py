"""The README's first-hour block and the offline --help examples run as written."""

import json
import os
import pathlib
import re
import shlex

import pytest

from sft_jax import cli

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _first_hour_commands():
  text = (_ROOT / "README.md").read_text()
  section = text.split("## The first hour", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
  return [shlex.split(l) for l in block.strip().splitlines()]


def _help_examples(module_main_help: str) -> list[list[str]]:
  """`sft-jax ...` example lines (joined across backslashes) of a --help."""
  text = module_main_help.replace("\\\n", " ")
  return [shlex.split(l.strip()) for l in text.splitlines()
          if l.strip().startswith("sft-jax ")]


def test_first_hour_block_runs_offline_as_written(tmp_path, monkeypatch,
                                                  capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a cold data cache
  monkeypatch.chdir(tmp_path)
  os.symlink(_ROOT / "configs", tmp_path / "configs")
  commands = _first_hour_commands()
  assert [c[:2] for c in commands] == [
      ["sft-jax", "train"], ["sft-jax", "eval"], ["sft-jax", "train"],
      ["sft-jax", "eval"], ["sft-jax", "generate"], ["sft-jax", "score"],
      ["sft-jax", "export"]]
  for argv in commands:
    assert cli.main(argv[1:]) == 0, argv
  out = capsys.readouterr()
  text = out.out + out.err
  assert "compiling the train step..." in text
  # The LoRA run: steps from two epochs, a step-0 evaluation, dropout
  # exported, held-out loss below a uniform guess after training.
  records = [json.loads(l) for l in open("runs/tiny_lora/metrics.jsonl")]
  steps = json.load(open("runs/tiny_lora/config.json"))["train"]["steps"]
  train = [r for r in records if "train/epoch" in r]
  assert train[-1]["step"] == steps  # the last step is always logged
  assert train[-1]["train/epoch"] == pytest.approx(2.0, abs=0.2)
  evals = [r for r in records if "eval/heldout/loss" in r]
  assert evals[0]["step"] == 0
  adapter = json.load(open("runs/tiny_lora/adapter/adapter_config.json"))
  assert adapter["lora_dropout"] == 0.1
  loss = json.load(open("runs/tiny/eval/loss_step_40.json"))["sets"]
  assert 0 < loss["heldout"]["loss"] < 5.77  # ln(320): uniform
  scores = [json.loads(l) for l in open("runs/tiny_lora/scores.jsonl")]
  assert len(scores) == 8 and all(sorted(s["ranking"]) == [0, 1]
                                  for s in scores)


def test_offline_help_examples_name_files_and_configs_that_exist():
  from sft_jax.train import cli as train_cli  # pylint: disable=g-import-not-at-top
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  examples = _help_examples(train_cli._EPILOG)  # pylint: disable=protected-access
  offline = [e for e in examples if "configs/tiny.py" in " ".join(e)]
  assert len(offline) == 2
  first_hour = [" ".join(c) for c in _first_hour_commands()]
  for argv in offline:
    spec = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if a.startswith("--config.")]
    config_lib.load_config(str(_ROOT / spec), overrides)
    # The README's block runs the same two commands (tested above).
    assert " ".join(argv) in first_hour
