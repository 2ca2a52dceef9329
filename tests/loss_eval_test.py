"""`sft-jax eval --metrics loss,...` and `eval.on_start`, against training's eval."""

import json
import math

import pytest

from sft_jax.infer import cli as infer_cli
from sft_jax.infer import loss_eval
from sft_jax.train import config as config_lib
from sft_jax.train import loop

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("loss_eval")
  cfg = config_lib.load_config(f"configs/tiny.py:steps={STEPS}", [
      f"--config.data.cache_dir={tmp / 'cache'}", "--config.eval.on_start=true",
      f"--config.eval.every_steps={STEPS}", "--config.log.every_steps=1"])
  assert loop.train(cfg, str(tmp / "run"), progress=False).exit_code == 0
  records = [json.loads(l) for l in open(tmp / "run" / "metrics.jsonl")]
  return tmp, {r["step"]: r for r in records if "eval/loss" in r}


def test_on_start_evaluates_the_model_before_the_first_update(run):
  _, evals = run
  assert sorted(evals) == [0, STEPS]
  # Random init (std 0.02): near-uniform predictions over the 320 tokens.
  assert evals[0]["eval/heldout/loss"] == pytest.approx(math.log(320), abs=0.1)
  assert evals[STEPS]["eval/heldout/loss"] < evals[0]["eval/heldout/loss"]


def test_cli_loss_equals_training_eval_for_a_run_and_its_hf_export(run):
  tmp, evals = run
  want = evals[STEPS]
  assert infer_cli.eval_main([
      "--run", str(tmp / "run"), "--step", str(STEPS),
      "--metrics", "loss,perplexity,token_accuracy"]) == 0
  got = json.load(open(tmp / "run" / "eval" / f"loss_step_{STEPS}.json"))
  heldout = got["sets"]["heldout"]
  assert heldout["loss"] == pytest.approx(want["eval/heldout/loss"], rel=1e-5)
  assert heldout["perplexity"] == pytest.approx(math.exp(heldout["loss"]))
  assert heldout["token_accuracy"] == pytest.approx(
      want["eval/heldout/accuracy"], abs=1e-6)
  assert heldout["tokens"] == want["eval/heldout/tokens"]

  # A Hugging Face directory, two named sets: the same numbers for the same
  # data, rendered and packed like training (same template, 64-token rows).
  hf = tmp / "hf"
  assert infer_cli.export_main(["--run", str(tmp / "run"), "--out", str(hf),
                                "--merge", "--dtype", "float32"]) == 0
  assert infer_cli.eval_main([
      "--run", str(hf), "--metrics", "loss,token_accuracy", "--seq-len", "64",
      "--data", "a=configs/tiny_data/eval.jsonl",
      "--data", "b=configs/tiny_data/chat.jsonl", "--out", str(tmp / "out")
  ]) == 0
  sets = json.load(open(tmp / "out" / "loss_step_0.json"))["sets"]
  assert sets["a"]["loss"] == pytest.approx(heldout["loss"], rel=1e-4)
  assert sets["a"]["tokens"] == heldout["tokens"]
  pooled = ((sets["a"]["loss"] * sets["a"]["tokens"] +
             sets["b"]["loss"] * sets["b"]["tokens"]) /
            (sets["a"]["tokens"] + sets["b"]["tokens"]))
  assert sets["all"]["loss"] == pytest.approx(pooled, rel=1e-6)


def test_data_names_and_bad_specs():
  assert loss_eval.parse_data(["x/eval.jsonl", "chat=a.jsonl"]) == {
      "eval": "x/eval.jsonl", "chat": "a.jsonl"}
  with pytest.raises(ValueError, match="two sets named 'a'"):
    loss_eval.parse_data(["a=x.jsonl", "a.jsonl"])
  with pytest.raises(ValueError, match="NAME=FILE"):
    loss_eval.parse_data(["=x.jsonl"])
