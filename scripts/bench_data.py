"""Throughput of the data pipeline: tokenizing (cache build) and packing.

Writes a synthetic chat corpus, tokenizes it once (cold: render, prefix-mask,
tokenize, write the cache) and then streams packed batches from the warm cache
through the Grain pipeline, printing examples/s and tokens/s for both.

  python scripts/bench_data.py --records 4000 --seq-len 2048 --batch-size 8

Without --tokenizer a 4k-vocabulary byte-level BPE is trained on the corpus
(a real tokenizer directory can be given instead).
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

_WORDS = ("the model data answer question packing token batch mask reply "
          "system user assistant template learning rate step loss gradient "
          "shard mixture source example length cache epoch seed vector "
          "matrix layer attention head sequence position segment").split()


def _sentence(rng, n):
  return " ".join(rng.choice(_WORDS, n)).capitalize() + "."


def _corpus(path, records, rng):
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(records):
      turns = [{"role": "system", "content": _sentence(rng, 8)}]
      for _ in range(rng.integers(1, 4)):
        turns.append({"role": "user", "content": " ".join(
            _sentence(rng, rng.integers(5, 30)) for _ in range(3))})
        turns.append({"role": "assistant", "content": " ".join(
            _sentence(rng, rng.integers(5, 30)) for _ in range(rng.integers(
                2, 12)))})
      f.write(json.dumps({"messages": turns}) + "\n")


def _train_tokenizer(path, corpus_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  with open(corpus_path, encoding="utf-8") as f:
    lines = [m["content"] for line in f for m in json.loads(line)["messages"]]
  tok.train_from_iterator(lines, trainers.BpeTrainer(
      vocab_size=4096, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  template = (
      "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
      "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if "
      "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>", chat_template=template).save_pretrained(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=4000)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--packing", default="first_fit",
                      choices=("first_fit", "best_fit", "pad"))
  parser.add_argument("--tokenize-workers", type=int, default=1)
  parser.add_argument("--tokenizer", default="")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()

  from sft_jax import data  # pylint: disable=g-import-not-at-top
  work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
  os.makedirs(work, exist_ok=True)
  corpus = os.path.join(work, "chat.jsonl")
  _corpus(corpus, args.records, np.random.default_rng(0))
  print(f"{os.cpu_count()} CPUs; {args.records} synthetic chat records")
  tok_dir = args.tokenizer or os.path.join(work, "tok")
  if not args.tokenizer:
    _train_tokenizer(tok_dir, corpus)
  tok = data.load_tokenizer(tok_dir)

  cfg = data.default_config()
  cfg.cache_dir = os.path.join(work, f"cache-{time.time_ns()}")
  cfg.packing = args.packing
  cfg.tokenize_workers = args.tokenize_workers
  cfg.sources.chat = data.source_config(path=corpus)
  t0 = time.perf_counter()
  src = data.prepare_source("chat", cfg.sources.chat, cfg, tok,
                            seq_len=args.seq_len)
  dt = time.perf_counter() - t0
  n_tok = int(src.tokenized.lengths.sum())
  print(f"tokenize (cold cache): {len(src.tokenized)} examples, {n_tok} "
        f"tokens in {dt:.2f}s: {len(src.tokenized) / dt:,.0f} examples/s, "
        f"{n_tok / dt:,.0f} tokens/s")

  it = iter(data.make_train_pipeline(cfg, tok, seq_len=args.seq_len,
                                     batch_size=args.batch_size))
  next(it)  # start-up (threads, first packing round) is not throughput
  t0 = time.perf_counter()
  real = segments = 0
  for _ in range(args.batches):
    b = next(it)
    seg = b["segment_ids"]
    real += int((seg > 0).sum())
    segments += int(sum(len(np.unique(r[r > 0])) for r in seg))
  dt = time.perf_counter() - t0
  total = args.batches * args.batch_size * args.seq_len
  print(f"pipeline (warm cache, {args.packing}, seq_len {args.seq_len}, "
        f"batch {args.batch_size}): {args.batches / dt:,.1f} batches/s, "
        f"{segments / dt:,.0f} examples/s, {real / dt:,.0f} tokens/s "
        f"(non-pad), packing efficiency {real / total:.3f}")


if __name__ == "__main__":
  main()
