"""Evaluation by generation: generate for held-out prompts, score the text.

Metrics (each a mean over samples unless said otherwise):
  exact_match  1 when prediction and reference are equal after stripping
               surrounding whitespace.
  rouge_l      ROUGE-L F-measure (rouge-score: lower-cased alphanumeric
               words, no stemming).
  bleu         corpus BLEU, 0-100 (sacrebleu defaults: 13a tokenisation,
               up to 4-grams, brevity penalty, "exp" smoothing).
  json_valid   1 when the prediction parses as JSON (a ```json fence
               around it is allowed).
  json_schema  1 when it parses and validates against `json_schema`.
"""

import json
import os
import re
from typing import Any, Callable, Sequence

import jsonschema
import sacrebleu
from rouge_score import rouge_scorer

from sft_jax.infer import generate as generate_lib
from sft_jax.infer import prompting
from sft_jax.infer import sampling as sampling_lib

DEFAULT_METRICS = ("exact_match", "rouge_l", "bleu")
ALL_METRICS = ("exact_match", "rouge_l", "bleu", "json_valid", "json_schema")

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL)


def _mean(values: Sequence[float]) -> float:
  return float(sum(values) / len(values)) if values else 0.0


def exact_match(predictions: Sequence[str],
                references: Sequence[str]) -> list[float]:
  """Per-sample 1.0/0.0: equal after stripping surrounding whitespace."""
  return [float(p.strip() == r.strip())
          for p, r in zip(predictions, references, strict=True)]


def rouge_l(predictions: Sequence[str],
            references: Sequence[str]) -> list[float]:
  """Per-sample ROUGE-L F-measure in [0, 1]."""
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  return [scorer.score(r, p)["rougeL"].fmeasure
          for p, r in zip(predictions, references, strict=True)]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU in [0, 100] with one reference per prediction."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions, "
                     f"{len(references)} references")
  return float(sacrebleu.corpus_bleu(
      list(predictions), [list(references)]).score)


def parse_json(text: str):
  """(True, value) when `text` (optionally ```json fenced) is JSON, else
  (False, None)."""
  text = text.strip()
  fenced = _FENCE.match(text)
  if fenced:
    text = fenced.group(1)
  try:
    return True, json.loads(text)
  except json.JSONDecodeError:
    return False, None


def json_valid(predictions: Sequence[str]) -> list[float]:
  """Per-sample 1.0 when the prediction parses as JSON."""
  return [float(parse_json(p)[0]) for p in predictions]


def json_schema_adherence(predictions: Sequence[str],
                          schema: dict[str, Any]) -> list[float]:
  """Per-sample 1.0 when the prediction is JSON valid under `schema`."""
  validator_cls = jsonschema.validators.validator_for(schema)
  validator_cls.check_schema(schema)
  validator = validator_cls(schema)
  out = []
  for p in predictions:
    ok, value = parse_json(p)
    out.append(float(ok and validator.is_valid(value)))
  return out


def score(predictions: Sequence[str], references: Sequence[str], *,
          metrics: Sequence[str] = DEFAULT_METRICS,
          json_schema: dict[str, Any] | None = None):
  """Corpus metrics and per-sample scores.

  Returns:
    (metrics {name: float}, per_sample {name: [float]}); BLEU is a corpus
    statistic only, so it has no per-sample entry.
  """
  unknown = set(metrics) - set(ALL_METRICS)
  if unknown:
    raise ValueError(f"unknown metrics {sorted(unknown)}; "
                     f"known: {list(ALL_METRICS)}")
  if "json_schema" in metrics and json_schema is None:
    raise ValueError("the json_schema metric needs a json_schema")
  per_sample: dict[str, list[float]] = {}
  per_fn: dict[str, Callable[[], list[float]]] = {
      "exact_match": lambda: exact_match(predictions, references),
      "rouge_l": lambda: rouge_l(predictions, references),
      "json_valid": lambda: json_valid(predictions),
      "json_schema": lambda: json_schema_adherence(predictions, json_schema),
  }
  result = {}
  for name in metrics:
    if name == "bleu":
      result[name] = bleu(predictions, references)
    else:
      per_sample[name] = per_fn[name]()
      result[name] = _mean(per_sample[name])
  return result, per_sample


def generation_metrics(model_cfg, variables, tokenizer,
                       records: Sequence[dict[str, Any]], *,
                       max_new_tokens: int,
                       metrics: Sequence[str] = DEFAULT_METRICS,
                       json_schema: dict[str, Any] | None = None,
                       sampling: sampling_lib.Sampling = sampling_lib.GREEDY,
                       batch_size: int = 8, seed: int = 0,
                       stop_ids: Sequence[int] | None = None,
                       fields=None, prompt_as_user_turn: bool = True,
                       template_kwargs: dict | None = None):
  """Generates an answer for every record and scores it.

  Args:
    model_cfg: models.ModelConfig.
    variables: {"params": ..., optionally "lora": ...}.
    tokenizer: the run's tokenizer (its chat template renders prompts).
    records: records in any training format (see prompting.split_record):
      the last assistant turn (completion, alpaca output) is the reference.
    max_new_tokens: generation budget per record.
    metrics: names from ALL_METRICS.
    json_schema: the schema for the json_schema metric.
    sampling: greedy by default, which makes evaluation deterministic.
    batch_size: prompts decoded together.
    seed: sampling seed.
    stop_ids: ids ending a generation (None: the tokenizer's EOS and the
      chat template's end-of-turn token).
    fields, prompt_as_user_turn: how records are read, as the training
      source's options of those names (None: the default field names).
    template_kwargs: the chat template's keyword arguments, as the training
      source's chat_template_kwargs.

  Returns:
    (metrics {name: float} plus "num_samples" and "mean_new_tokens",
     samples [{"prompt", "reference", "prediction", "stopped", per-sample
     scores}]).
  """
  prompts, references, ids = [], [], []
  for i, record in enumerate(records):
    prompt, reference, raw = prompting.split_record(
        record, f"record {i}", fields=fields,
        prompt_as_user_turn=prompt_as_user_turn)
    prompts.append(prompt)
    references.append(reference)
    ids.append(prompting.encode_prompt(
        tokenizer, prompt, raw=raw, template_kwargs=template_kwargs,
        tools=prompting.tools_of_record(record, f"record {i}", fields=fields)))
  completions = generate_lib.generate(
      model_cfg, variables, ids, max_new_tokens=max_new_tokens,
      stop_ids=(prompting.stop_ids(tokenizer) if stop_ids is None
                else stop_ids), sampling=sampling, seed=seed,
      batch_size=batch_size)
  predictions = [prompting.decode(tokenizer, c.content_tokens)
                 for c in completions]
  result, per_sample = score(predictions, references, metrics=metrics,
                             json_schema=json_schema)
  result["num_samples"] = float(len(records))
  result["mean_new_tokens"] = _mean(
      [len(c.content_tokens) for c in completions])
  samples = []
  for i, c in enumerate(completions):
    sample = {"prompt": prompts[i], "reference": references[i],
              "prediction": predictions[i], "stopped": c.stopped}
    sample.update({k: v[i] for k, v in per_sample.items()})
    samples.append(sample)
  return result, samples


def write_results(out_dir: str, step: int, metrics: dict[str, float],
                  samples: list[dict[str, Any]], *, prefix: str = "gen",
                  writer=None, json_file: bool = True) -> str:
  """Logs metrics to TensorBoard and writes metrics + samples as JSON.

  Args:
    out_dir: directory of the JSON files (created if needed):
      `{out_dir}/{prefix}_step_{step}.json`.
    step: the training step the weights come from.
    metrics: {name: float}; logged as `{prefix}/{name}`.
    samples: the generations, written beside the metrics.
    prefix: TensorBoard tag prefix and file name stem.
    writer: a tensorboard.summary.Writer, or None to skip TensorBoard.
    json_file: False writes only the TensorBoard scalars.

  Returns:
    The JSON file's path.
  """
  if writer is not None:
    for name, value in metrics.items():
      writer.add_scalar(f"{prefix}/{name}", float(value), step=step)
    writer.flush()
  path = os.path.join(out_dir, f"{prefix}_step_{step}.json")
  if not json_file:
    return path
  os.makedirs(out_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"step": step, "metrics": metrics, "samples": samples}, f,
              indent=1, ensure_ascii=False)
  return path
