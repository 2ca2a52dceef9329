"""train.epochs: steps from the packed mixture; examples and epochs seen."""

import json
import math

import numpy as np
import pytest

from sft_jax.train import config as config_lib
from sft_jax.train import epochs
from sft_jax.train import loop


def test_count_examples_counts_segment_starts_by_source():
  batch = {"positions": np.array([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]]),
           "segment_ids": np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 0]]),
           "source_id": np.array([[1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 1, 0]])}
  assert epochs.count_examples(batch, ["a", "b", "c"]) == {
      "a": 1, "b": 2, "c": 1}


def test_epochs_set_the_steps_and_the_schedule_and_are_logged(tmp_path,
                                                             capsys):
  cfg = config_lib.load_config("configs/tiny.py", [
      f"--config.data.cache_dir={tmp_path / 'cache'}",
      "--config.train.epochs=1.5", "--config.log.every_steps=1",
      "--config.optim.warmup_steps=2"])
  result = loop.train(cfg, str(tmp_path / "run"), progress=True)
  assert result.exit_code == 0
  out = capsys.readouterr()
  text = out.out + out.err
  saved = json.load(open(tmp_path / "run" / "config.json"))
  steps = saved["train"]["steps"]
  assert result.step == steps
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  last = records[-1]
  sizes = {n: 64 for n in ("chat", "alpaca", "prompt_completion")}
  seen = {n: last[f"train/examples/{n}"] for n in sizes}
  for n in sizes:
    assert last[f"train/epochs/{n}"] == pytest.approx(seen[n] / sizes[n])
  assert last["train/epoch"] == pytest.approx(sum(seen.values()) / 192)
  # The step count came from the packing of the stream: 1.5 epochs are
  # reached within the last step's examples.
  per_step = sum(seen.values()) / steps
  assert abs(last["train/epoch"] - 1.5) * 192 <= 2 * per_step
  assert math.ceil(1.5 * 192 / per_step) == pytest.approx(steps, abs=2)
  # The schedule is as long as the run: cosine from the peak to 0 at the end.
  lrs = [r["train/lr"] for r in records if "train/lr" in r]
  assert max(lrs) == pytest.approx(cfg.optim.lr, rel=1e-3)
  assert lrs[-1] < 0.02 * cfg.optim.lr
  # Progress off a terminal: what is happening, with times, and no bar.
  assert f"train.epochs=1.5: 192 examples in 3 sources" in text
  assert f"-> train.steps={steps}" in text
  assert "tokenized source 'chat': 64 examples" in text
  assert "compiling the train step..." in text
  assert "compiled the train step in " in text
  assert f"saved checkpoint {steps} (" in text
  assert "\r" not in text
  line = [l for l in text.splitlines() if l.startswith(f"step {steps}/")][0]
  assert f"epoch {last['train/epoch']:.2f}  elapsed " in line
  assert line.endswith("ETA 0s")
