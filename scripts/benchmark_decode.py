#!/usr/bin/env python3
"""Decode speed (generated tokens/s) of random-weight models, as JSON.

  python scripts/benchmark_decode.py --model tiny
  python scripts/benchmark_decode.py --model 100m --batch 4 --new 256

The whole generation (prefill + a while loop of one-token steps over the
KV cache) is one compiled program; the timed call runs after a warmup call
with the same shapes, so compile time is excluded and reported apart.
"""

import argparse
import json
import time

import jax
import numpy as np

from sft_jax import models
from sft_jax.infer import generate

_MODELS = {
    # configs/tiny.py's architecture.
    "tiny": dict(model_type="llama", vocab_size=320, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # ~110M parameters (85M in the layers), Llama-shaped.
    "100m": dict(model_type="llama", vocab_size=32000, hidden_size=768,
                 intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64),
}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", choices=sorted(_MODELS), default="tiny")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
  p.add_argument("--new", type=int, default=256, help="generated tokens")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  hf = dict(_MODELS[args.model], rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False)
  cfg = models.ModelConfig.from_hf_config(hf)
  variables = models.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, cfg.vocab_size, args.prompt).tolist()
             for _ in range(args.batch)]

  def run():
    return generate.generate(cfg, variables, prompts,
                             max_new_tokens=args.new,
                             batch_size=args.batch)

  start = time.perf_counter()
  run()
  first_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - start)
  generated = sum(len(c.tokens) for c in out)
  best = min(times)
  print(json.dumps({
      "model": args.model, "device": jax.devices()[0].device_kind,
      "params": int(sum(x.size for x in jax.tree.leaves(variables))),
      "batch": args.batch, "prompt": args.prompt, "new": args.new,
      "generated_tokens": generated, "first_call_s": round(first_s, 2),
      "best_s": round(best, 3),
      "tokens_per_s": round(generated / best, 1)}))


if __name__ == "__main__":
  main()
