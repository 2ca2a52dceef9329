"""Tests for sft_jax/demo: the generated task, the corpus, the tiny demo run."""

import glob
import json
import math
import os
import re

import pytest

from sft_jax.demo import assets
from sft_jax.demo import cli
from sft_jax.demo import corpus
from sft_jax.demo import task


def test_task_answers_are_the_sentence_fields_and_held_out_is_disjoint():
  train, held_out = task.make_splits(300, 50, seed=3)
  assert (len(train), len(held_out)) == (300, 50)
  sentences = [r["messages"][0]["content"] for r in train + held_out]
  assert len(set(sentences)) == 350
  for record in train + held_out:
    user, reply = (m["content"] for m in record["messages"])
    fields = json.loads(reply)
    assert list(fields) == ["name", "item", "quantity", "city", "day"]
    sentence = user.split("\n", 1)[1]
    for key in ("name", "city", "day"):
      assert fields[key] in sentence
    qty = fields["quantity"]
    assert (re.search(rf"\b{qty}\b", sentence)
            or task._NUMBER_WORDS[qty - 1] in sentence.split())
    words = re.findall(r"\w+", sentence)
    plural = dict(task.ITEMS)[fields["item"]]
    assert (fields["item"] if qty == 1 else plural) in words
    assert reply == task.answer(fields)
  # Deterministic from the seed.
  assert task.make_splits(300, 50, seed=3) == (train, held_out)


def test_task_score():
  ref = task.answer({"name": "Mei Lin", "item": "lamp", "quantity": 2,
                     "city": "Oslo", "day": "Monday"})
  assert task.score(ref, ref) == {"exact_match": 1.0, "json_valid": 1.0,
                                  "fields_correct": 1.0}
  spaced = json.dumps(json.loads(ref))  # same object, other spacing
  assert task.score(spaced, ref) == {"exact_match": 0.0, "json_valid": 1.0,
                                     "fields_correct": 1.0}
  assert task.score('{"name": "Mei', ref)["json_valid"] == 0.0


def test_task_field_accuracy_counts_fields_exactly_right():
  ref = task.answer({"name": "Mei Lin", "item": "lamp", "quantity": 2,
                     "city": "Oslo", "day": "Monday"})
  assert task.field_accuracy(ref, ref) == 1.0
  assert task.field_accuracy(json.dumps(json.loads(ref)), ref) == 1.0
  wrong = ref.replace("Oslo", "Lima").replace('"quantity":2', '"quantity":3')
  assert task.field_accuracy(wrong, ref) == pytest.approx(3 / 5)
  assert task.field_accuracy(ref.replace("2", '"2"'), ref) == 0.8
  assert task.field_accuracy('{"name":"Mei Lin"', ref) == 0.0
  assert task.field_accuracy('["Mei"]', ref) == 0.0


def test_corpus_chunks_fit_and_splits_use_disjoint_conversations():
  train, held_out = corpus.make_splits(30, 5, max_chars=200, seed=1)
  assert len(train) >= 30 and len(held_out) >= 5
  for r in train + held_out:
    assert 0 < len(r["text"]) <= 200
    assert all(re.match(r"[AB]: ", line) for line in r["text"].split("\n"))
  assert not {r["text"] for r in train} & {r["text"] for r in held_out}


def _events(logdir):
  """Scalars of a TensorBoard logdir, read by TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
         for tag in acc.Tags()["scalars"]}
  for tag in acc.Tags()["tensors"]:
    values = [(e.step, tensor_util.make_ndarray(e.tensor_proto))
              for e in acc.Tensors(tag)]
    if all(v.size == 1 for _, v in values):  # scalars, not HParams protos
      out[tag] = [(step, v.item()) for step, v in values]
  return out


def test_tiny_demo_runs_end_to_end_and_reruns_as_a_no_op(tmp_path, capsys,
                                                         monkeypatch):
  # The demo's runs use one device (its mesh is 1x1x1), like a plain CPU
  # machine: its train processes must not inherit the 8 simulated devices.
  monkeypatch.setenv("XLA_FLAGS", "")
  root = str(tmp_path / "demo")
  assert cli.run(root, "tiny") == 0
  out = capsys.readouterr().out
  assert "demo.png" in out and "tensorboard --logdir" in out

  results = json.load(open(os.path.join(root, "results.json")))
  size = assets.SIZES["tiny"]
  before, after = results["before"], results["after"]
  assert [r["share"] for r in after] == list(size.shares)
  vocab = json.load(open(os.path.join(root, "base", "config.json")))[
      "vocab_size"]
  for row in [before] + after:
    for name in ("exact_match", "field_accuracy", "json_valid",
                 "domain_accuracy"):
      assert 0.0 <= row[name] <= 1.0
    for name in ("domain_loss", "general_loss"):
      # Finite; a few steps from the N(0, 1/hidden) init can sit above a
      # uniform guess, so only the direction of change is checked below.
      assert 0.0 < row[name] < 3 * math.log(vocab)
  assert before["step"] == 0  # eval.on_start of the SFT runs
  assert all(r["step"] == size.sft_steps for r in after)
  # Continued pretraining lowers the held-out chat loss...
  cpt_curve = results["curves"]["cpt"]
  assert cpt_curve[-1][1] < cpt_curve[0][1]
  # ...SFT on the task lowers the task loss, and the run with general data
  # mixed in ends with a lower general loss than the run without.
  assert after[0]["domain_loss"] < before["domain_loss"]
  assert after[-1]["general_loss"] < after[0]["general_loss"]

  # "Before" is the first SFT run's step-0 evaluation, as logged; every
  # point starts from the same model, so every step-0 evaluation agrees.
  starts = []
  for run in (os.path.join(root, "sft", r["run"]) for r in after):
    start = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
      record = json.loads(line)
      if record["step"] == 0:
        start.update(record)
    starts.append(start)
  for start in starts:
    assert start["eval/general/loss"] == pytest.approx(before["general_loss"])
    assert start["eval/gen/exact_match"] == before["exact_match"]
  run0 = os.path.join(root, "sft", after[0]["run"])
  samples = json.load(open(os.path.join(
      run0, "eval", "gen_step_0.json")))["samples"]
  assert before["field_accuracy"] == pytest.approx(sum(
      task.field_accuracy(s["prediction"], s["reference"])
      for s in samples) / len(samples))

  with open(os.path.join(root, "demo.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = open(os.path.join(root, "results.md")).read()
  assert table.count("after SFT") == len(size.shares)
  assert os.path.exists(os.path.join(root, "sft", "summary.csv"))

  # TensorBoard: each run's curves, and the summary against the share.
  assert glob.glob(os.path.join(root, "cpt", "tb", "events.*"))
  summary = _events(os.path.join(root, "tb_summary"))
  assert summary["demo/after_sft/general_loss"] == [
      (int(round(100 * r["share"])), pytest.approx(r["general_loss"]))
      for r in after]
  # The SFT runs start from the continued-pretrained model as it ended.
  cpt_events = _events(os.path.join(root, "cpt", "tb"))
  assert cpt_events["eval/general/loss"][-1][1] == pytest.approx(
      before["general_loss"], rel=1e-4)

  # A second run finds every stage done and trains nothing.
  mtimes = {p: os.path.getmtime(p) for p in glob.glob(
      os.path.join(root, "**", "metrics.jsonl"), recursive=True)}
  assert cli.run(root, "tiny") == 0
  assert "already finished" in capsys.readouterr().out
  assert mtimes == {p: os.path.getmtime(p) for p in mtimes}
  assert json.load(open(os.path.join(root, "results.json"))) == results
