"""Generation metrics against values computed by hand."""

import math

import pytest

from sft_jax.infer import evaluate


def test_exact_match_strips_whitespace_only():
  got = evaluate.exact_match([" Paris\n", "paris", "Rome"],
                             ["Paris", "Paris", "Rome"])
  assert got == [1.0, 0.0, 1.0]


def test_rouge_l_by_hand():
  # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4
  # words; P = 4/5, R = 4/6, F = 2PR/(P+R) = 2*4/(5+6).
  got = evaluate.rouge_l(["the cat on a mat", "x y", "The Cat"],
                         ["the cat sat on the mat", "x y", "dog"])
  assert got[0] == pytest.approx(8 / 11, abs=1e-12)
  assert got[1] == 1.0
  assert got[2] == 0.0


def test_bleu_by_hand():
  preds = ["the cat sat on the mat", "a dog runs"]
  refs = ["the cat sat on a mat", "a dog runs fast"]
  # Clipped n-gram matches / counts, summed over both sentences:
  #   1-grams: (5 + 3) / (6 + 3); 2-grams: (3 + 2) / (5 + 2);
  #   3-grams: (2 + 1) / (4 + 1); 4-grams: (1 + 0) / (3 + 0).
  # Hypothesis length 9 < reference length 10: BP = exp(1 - 10/9).
  precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
  want = 100 * math.exp(1 - 10 / 9) * math.exp(
      sum(math.log(p) for p in precisions) / 4)
  assert evaluate.bleu(preds, refs) == pytest.approx(want, abs=1e-9)
  # One sentence, equal lengths: (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
  one = evaluate.bleu(preds[:1], refs[:1])
  assert one == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 / 3) ** 0.25)


def test_json_validity_and_schema():
  preds = ['{"name": "x", "n": 2}', '```json\n{"name": 3}\n```', "nope",
           '{"name": ', "[1, 2]"]
  assert evaluate.json_valid(preds) == [1.0, 1.0, 0.0, 0.0, 1.0]
  schema = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}}}
  assert evaluate.json_schema_adherence(preds, schema) == [
      1.0, 0.0, 0.0, 0.0, 0.0]


def test_score_aggregates_and_rejects_unknown_metrics():
  preds, refs = ["a b", '{"k": 1}'], ["a b", "x"]
  result, per = evaluate.score(
      preds, refs, metrics=("exact_match", "json_valid", "json_schema"),
      json_schema={"type": "object"})
  assert result == {"exact_match": 0.5, "json_valid": 0.5,
                    "json_schema": 0.5}
  assert per["exact_match"] == [1.0, 0.0]
  with pytest.raises(ValueError, match="unknown metrics"):
    evaluate.score(preds, refs, metrics=("accuracy",))
  with pytest.raises(ValueError, match="needs a json_schema"):
    evaluate.score(preds, refs, metrics=("json_schema",))
