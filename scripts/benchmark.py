#!/usr/bin/env python3
"""Benchmarks the train step of a config; same as `sft-jax bench`.

  python scripts/benchmark.py --config configs/presets/llama3_1b.py:method=lora
"""

import sys

from sft_jax.train import bench

if __name__ == "__main__":
  sys.exit(bench.main(sys.argv[1:]))
