"""Writes configs/tiny_data/: the sample data and tokenizer of configs/tiny.py.

The files are committed, so configs/tiny.py trains from a clean clone with
nothing downloaded; this script is how they were made (deterministic):

  chat.jsonl               {"messages": [...]} records
  alpaca.jsonl             {"instruction", "input", "output"} records
  prompt_completion.jsonl  {"prompt", "completion"} records
  eval.jsonl               held-out {"messages"} records (eval sets)
  score.jsonl              {"prompt", "candidates"} lines for `sft-jax score`
  tokenizer/               a 320-token byte-level BPE with a ChatML template

Usage: python scripts/make_tiny_data.py [OUT_DIR]
"""

import json
import os
import random
import sys

_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo")
_WORDS = ("apple", "river", "stone", "cloud", "green", "light", "table",
          "music", "paper", "tiger", "ocean", "plant")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
VOCAB_SIZE = 320  # configs/tiny.py's model has vocab_size=320.


def _task(rng: random.Random) -> tuple[str, str]:
  """One (question, answer) pair of a small deterministic task."""
  kind = rng.randrange(4)
  if kind == 0:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
  if kind == 1:
    w = rng.choice(_WORDS)
    return f"Spell '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'."
  if kind == 2:
    w = rng.choice(_WORDS)
    return f"Write '{w}' in capitals.", f"{w.upper()}"
  n = rng.choice(_NAMES)
  return f"Say hello to {n}.", f"Hello, {n}! Nice to meet you."


def records(num: int, seed: int):
  rng = random.Random(seed)
  return [_task(rng) for _ in range(num)]


def write(out: str) -> None:
  os.makedirs(out, exist_ok=True)

  def dump(name, rows):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")

  dump("chat.jsonl", [
      {"messages": [{"role": "user", "content": q},
                    {"role": "assistant", "content": a}]}
      for q, a in records(64, seed=1)])
  dump("alpaca.jsonl", [
      {"instruction": "Answer the request.",
       "input": q, "output": a} for q, a in records(64, seed=2)])
  dump("prompt_completion.jsonl", [
      {"prompt": q, "completion": a} for q, a in records(64, seed=3)])
  dump("eval.jsonl", [
      {"messages": [{"role": "user", "content": q},
                    {"role": "assistant", "content": a}]}
      for q, a in records(16, seed=4)])

  pairs = records(8, seed=6)
  dump("score.jsonl", [
      {"prompt": q, "candidates": [a, pairs[(i + 1) % len(pairs)][1]]}
      for i, (q, a) in enumerate(pairs)])

  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<|im_start|>",
                                             "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(
      [t for pair in records(256, seed=5) for t in pair], trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
      chat_template=CHAT_TEMPLATE)
  fast.save_pretrained(os.path.join(out, "tokenizer"))


if __name__ == "__main__":
  write(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "..", "configs",
      "tiny_data"))
