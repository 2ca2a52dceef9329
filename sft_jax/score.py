"""`sft-jax score`: log-probabilities of completions, and ranking of candidates.

Each input line is one of
  {"prompt": str, "completion": str}        -> {"logprob": float, "num_tokens": int}
  {"prompt": str, "candidates": [str, ...]} -> {"logprobs": [float, ...],
                                                "ranking": [int, ...]}  # best first
  ... with "label": int or [int, ...]   -> also "rank": 1-based rank of the
                                           best-ranked right candidate
where logprob = sum over completion tokens of log p(token | everything before).
Token ids are `tokenizer(prompt)` (the tokenizer's default special tokens)
followed by `tokenizer(completion, add_special_tokens=False)`; with --chat the
prompt is a user turn rendered by the model's chat template, up to and
including the assistant header (as `sft-jax generate` renders it).

Over the labelled lines, `ranking_metrics` gives top-1 and top-5 accuracy (a
right candidate ranked first / within the first five) and the mean reciprocal
rank (MRR, mean of 1 / rank); `sft-jax score` prints them.

Sequences are packed several to a row (segment ids keep them apart) into rows of
a bucketed static length, so one compiled forward pass serves the whole file.
"""

import argparse
import dataclasses
import functools
import json
import sys
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import errors
from sft_jax import models


class ScoreInputError(errors.UserError, ValueError):
  """A malformed input line; the message names the file and line."""
  what = "data"


class _Request(NamedTuple):
  where: str           # "file:line" of the input record
  prompt_ids: list     # token ids of the prompt (with special tokens)
  completions: list    # one list of token ids per completion / candidate
  is_ranking: bool
  labels: tuple = ()   # indices of the right candidates (ranking lines)


def read_requests(path: str, tokenizer, *, chat: bool = False) -> list:
  """Parses and tokenizes every line of `path`; raises ScoreInputError.

  chat: render each prompt as a user turn with the tokenizer's template.
  """
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  try:
    records = prompting.read_jsonl(path)
  except ValueError as e:
    raise ScoreInputError(str(e)) from None
  requests = []
  for record, where in records:
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
      raise ScoreInputError(f"{where}: 'prompt' must be a string")
    has_completion = "completion" in record
    if has_completion == ("candidates" in record):
      raise ScoreInputError(
          f"{where}: expected exactly one of 'completion' or 'candidates'")
    if has_completion:
      texts = [record["completion"]]
      if not isinstance(texts[0], str):
        raise ScoreInputError(f"{where}: 'completion' must be a string")
    else:
      texts = record["candidates"]
      if (not isinstance(texts, list) or not texts
          or not all(isinstance(t, str) for t in texts)):
        raise ScoreInputError(
            f"{where}: 'candidates' must be a non-empty list of strings")
    labels = _labels(record, where, len(texts)) if not has_completion else ()
    if chat:
      try:
        prompt_ids = prompting.encode_prompt(tokenizer, prompt)
      except ValueError as e:
        raise ScoreInputError(f"{where}: --chat: {e}") from None
    else:
      prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
      raise ScoreInputError(
          f"{where}: the prompt tokenizes to no tokens, so the first "
          "completion token has no context to be scored against")
    completions = [list(tokenizer(t, add_special_tokens=False)["input_ids"])
                   for t in texts]
    requests.append(_Request(where, prompt_ids, completions,
                             not has_completion, labels))
  return requests


def _labels(record, where, num_candidates) -> tuple:
  """The `label` of a ranking line as a tuple of candidate indices."""
  if "label" not in record:
    return ()
  label = record["label"]
  labels = label if isinstance(label, list) else [label]
  if (not labels or not all(isinstance(i, int) and not isinstance(i, bool)
                            for i in labels)
      or not all(0 <= i < num_candidates for i in labels)):
    raise ScoreInputError(
        f"{where}: 'label' must be a candidate index in [0, "
        f"{num_candidates}) or a non-empty list of them, got {label!r}")
  return tuple(labels)


def ranking_metrics(records) -> dict:
  """top1, top5, mrr over output records that have a "rank"; n = count."""
  ranks = np.asarray([r["rank"] for r in records if "rank" in r], np.float64)
  if not len(ranks):
    return {"n": 0}
  return {"top1": float(np.mean(ranks <= 1)), "top5": float(np.mean(ranks <= 5)),
          "mrr": float(np.mean(1.0 / ranks)), "n": int(len(ranks))}


class _Sequence(NamedTuple):
  ids: list          # prompt + completion token ids
  num_prompt: int    # how many of `ids` belong to the prompt
  key: tuple         # (request index, completion index)


def _bucket(n: int, minimum: int = 32) -> int:
  """The smallest power of two >= max(n, minimum)."""
  size = minimum
  while size < n:
    size *= 2
  return size


def _pack(seqs: Sequence[_Sequence], row_len: int) -> list:
  """First-fit-decreasing packing of sequences into rows of `row_len` inputs.

  A sequence of n ids needs n - 1 input positions (the last id is only a
  target). Returns a list of rows, each a list of sequence indices.
  """
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
  rows, free = [], []
  for i in order:
    need = len(seqs[i].ids) - 1
    for r, space in enumerate(free):
      if space >= need:
        rows[r].append(i)
        free[r] -= need
        break
    else:
      rows.append([i])
      free.append(row_len - need)
  return rows


def _row_arrays(seqs, row, row_len):
  """Inputs and scoring masks of one packed row, as numpy arrays [T]."""
  tokens = np.zeros(row_len, np.int32)
  targets = np.zeros(row_len, np.int32)
  positions = np.zeros(row_len, np.int32)
  segment_ids = np.zeros(row_len, np.int32)
  owner = np.full(row_len, -1, np.int64)  # which sequence scores this slot
  start = 0
  for seg, i in enumerate(row, start=1):
    ids = seqs[i].ids
    n = len(ids) - 1
    tokens[start:start + n] = ids[:-1]
    targets[start:start + n] = ids[1:]
    positions[start:start + n] = np.arange(n)
    segment_ids[start:start + n] = seg
    # Target j is token j + 1: completion tokens are targets from
    # num_prompt - 1 on.
    owner[start + seqs[i].num_prompt - 1:start + n] = i
    start += n
  return tokens, targets, positions, segment_ids, owner


@functools.lru_cache(maxsize=4)
def _make_logprob_fn(model_cfg):
  model = models.Transformer(model_cfg)

  @jax.jit
  def target_logprobs(variables, tokens, targets, positions, segment_ids):
    logits = model.apply(variables, tokens, positions, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  return target_logprobs


def score_sequences(model_cfg, params, seqs: Sequence[_Sequence], *,
                    batch_size: int = 8, row_len: int = 0,
                    lora: dict | None = None) -> np.ndarray:
  """Sum of completion-token log-probs for each sequence, float64 [len(seqs)].

  `lora`: the "lora" collection of a LoRA run (applied over `params`).
  """
  variables = {"params": params, **({"lora": lora} if lora else {})}
  if not seqs:
    return np.zeros(0)
  longest = max(len(s.ids) - 1 for s in seqs)
  row_len = row_len or _bucket(longest)
  if longest > row_len:
    raise ValueError(f"a sequence of {longest + 1} tokens exceeds row length "
                     f"{row_len}")
  fn = _make_logprob_fn(model_cfg)
  rows = _pack(seqs, row_len)
  totals = np.zeros(len(seqs))
  for b in range(0, len(rows), batch_size):
    chunk = rows[b:b + batch_size]
    arrays = [_row_arrays(seqs, row, row_len) for row in chunk]
    # Pad the batch to a fixed number of rows so the step compiles once.
    while len(arrays) < batch_size:
      empty = np.zeros(row_len, np.int32)
      arrays.append((empty, empty, empty, empty, np.full(row_len, -1)))
    tokens, targets, positions, segment_ids, owner = (
        np.stack(a) for a in zip(*arrays))
    logp = np.asarray(fn(variables, tokens, targets, positions, segment_ids),
                      np.float64)
    valid = owner >= 0
    np.add.at(totals, owner[valid], logp[valid])
  return totals


def score_requests(model_cfg, params, requests, *, batch_size=8,
                   lora=None) -> Iterator:
  """Yields one output record per request, in input order."""
  seqs = []
  for r_idx, req in enumerate(requests):
    for c_idx, completion in enumerate(req.completions):
      seqs.append(_Sequence(req.prompt_ids + completion, len(req.prompt_ids),
                            (r_idx, c_idx)))
  totals = score_sequences(model_cfg, params, seqs, batch_size=batch_size,
                           lora=lora)
  by_key = {s.key: float(t) for s, t in zip(seqs, totals)}
  for r_idx, req in enumerate(requests):
    logprobs = [by_key[(r_idx, c)] for c in range(len(req.completions))]
    if req.is_ranking:
      ranking = sorted(range(len(logprobs)), key=lambda c: -logprobs[c])
      out = {"logprobs": logprobs, "ranking": ranking}
      if req.labels:
        out["rank"] = 1 + min(ranking.index(i) for i in req.labels)
      yield out
    else:
      yield {"logprob": logprobs[0], "num_tokens": len(req.completions[0])}


def _parse_args(argv):
  p = argparse.ArgumentParser(
      prog="sft-jax score",
      description=(
          "Score completions with a causal LM. Each input line is "
          '{"prompt": str, "completion": str} -> {"logprob", "num_tokens"}, or '
          '{"prompt": str, "candidates": [str, ...]} -> {"logprobs", '
          '"ranking"} (candidate indices, best first); with "label" (index of '
          'the right candidate, or a list) also "rank", and top-1 / top-5 '
          "accuracy and MRR over the file are printed. logprob is the sum of "
          "log p(completion token | all before); the prompt is tokenized with "
          "the tokenizer's default special tokens, the completion without."))
  p.add_argument("--model", required=True,
                 help="a run directory (sft-jax train --workdir), or a Hugging "
                      "Face model directory or hub id (safetensors); the "
                      "tokenizer comes from the same place")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step of a run (default: the latest)")
  p.add_argument("--chat", action="store_true",
                 help="render each prompt as a user turn with the model's "
                      "chat template (as `sft-jax generate` does); default: "
                      "the prompt text as is")
  p.add_argument("--data", required=True, help="input JSONL file")
  p.add_argument("--out", required=True, help="output JSONL file")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute and parameter dtype (default: float32)")
  p.add_argument("--batch-size", type=int, default=8,
                 help="packed rows per forward pass (default: 8)")
  p.add_argument("--metrics", default="",
                 help="also write the ranking metrics (top1, top5, mrr, n) "
                      "as JSON to this file")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  import transformers  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top

  run = loading.is_run_dir(args.model)
  try:
    if args.step is not None and not run:
      raise ScoreInputError(f"--step applies to run directories; "
                            f"{args.model!r} has no checkpoints/ folder")
    if run:
      loaded = loading.load(args.model, step=args.step, dtype=args.dtype,
                            merge_lora=True)
      tokenizer = loaded.tokenizer
    else:
      tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    requests = read_requests(args.data, tokenizer, chat=args.chat)
  except OSError as e:
    raise errors.UserError(f"{args.model}: cannot load the tokenizer ({e})",
                           what="model") from e
  if run:
    model_cfg, params = loaded.model_cfg, loaded.variables["params"]
  else:
    model_cfg, params = models.load_hf(args.model, dtype=args.dtype)
    model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype)
  records = []
  with open(args.out, "w", encoding="utf-8") as f:
    for record in score_requests(model_cfg, params, requests,
                                 batch_size=args.batch_size):
      f.write(json.dumps(record) + "\n")
      records.append(record)
  print(f"scored {len(requests)} lines -> {args.out}")
  metrics = ranking_metrics(records)
  if metrics["n"]:
    print("ranking over {n} labelled lines: top1 {top1:.4f}  top5 {top5:.4f}"
          "  mrr {mrr:.4f}".format(**metrics))
  if args.metrics:
    with open(args.metrics, "w", encoding="utf-8") as f:
      json.dump(metrics, f)
  return 0
