#!/usr/bin/env python3
"""Runs a table of train-step benchmarks and writes JSON + markdown.

  python scripts/benchmark_table.py                  # the accelerator table
  python scripts/benchmark_table.py --rows tiny      # a CPU smoke table

Each row is `sft-jax bench` on a preset (random weights, synthetic packed
batch), run in its own process so one row running out of memory is a row
marked "failed", not a lost table. Rows run in order until --budget-s is
spent; the rest are marked "skipped". Output:
experiments/benchmarks/<device>-<date>.json and .md (or --out-dir).

Columns: tokens/s, MFU (MaxText's causal count against the device's bf16
peak, 989 TFLOP/s for H100/H200; see sft_jax/train/flops.py), peak memory
(device allocator peak), compile time, the attention backend per layer
pattern, and the remat policy.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# (name, config, overrides). One accelerator; ~16k tokens per step; ordered
# by priority, since a budget may cut the table short.
ACCELERATOR_ROWS = (
    ("llama3.2-1b full 4096", "configs/presets/llama3_1b.py:method=full",
     dict(seq_len=4096, batch_size=4, remat="save_dot_except_mlp")),
    ("llama3.1-8b lora 4096", "configs/presets/llama3_8b.py:method=lora",
     dict(seq_len=4096, batch_size=4, remat="full")),
    ("llama3.2-1b lora 4096", "configs/presets/llama3_1b.py:method=lora",
     dict(seq_len=4096, batch_size=4, remat="save_dot_except_mlp")),
    ("gemma3-1b full 4096", "configs/presets/gemma3_1b.py:method=full",
     dict(seq_len=4096, batch_size=4, remat="save_dot_except_mlp")),
    ("llama3.1-8b full 4096", "configs/presets/llama3_8b.py:method=full",
     dict(seq_len=4096, batch_size=2, remat="full")),
    ("qwen2.5-7b lora 4096", "configs/presets/qwen25_7b.py:method=lora",
     dict(seq_len=4096, batch_size=4, remat="full")),
    ("llama3.2-1b full 2048", "configs/presets/llama3_1b.py:method=full",
     dict(seq_len=2048, batch_size=8, remat="save_dot_except_mlp")),
    ("llama3.2-1b full 8192", "configs/presets/llama3_1b.py:method=full",
     dict(seq_len=8192, batch_size=2, remat="save_dot_except_mlp")),
)
TINY_ROWS = (
    ("tiny full 128", "configs/tiny.py",
     dict(seq_len=128, batch_size=4, remat="none")),
    ("tiny full 256 remat", "configs/tiny.py",
     dict(seq_len=256, batch_size=2, remat="save_qkv_proj")),
)
_COLUMNS = ("row", "status", "attention", "remat", "tokens_per_s", "mfu",
            "peak_memory_gb", "compile_s", "step_s")


def bench_argv(config: str, overrides: dict, steps: int) -> list[str]:
  return ["bench", "--config", config, "--steps", str(steps), "--warmup", "1",
          f"--config.train.seq_len={overrides['seq_len']}",
          f"--config.train.batch_size={overrides['batch_size']}",
          "--config.train.grad_accum=1",
          f"--config.model.remat={overrides['remat']}"]


def run_row(name, config, overrides, *, steps, timeout_s, isolate):
  """One row's bench JSON plus name/status (never raises for the row)."""
  argv = bench_argv(config, overrides, steps)
  start = time.perf_counter()
  if not isolate:
    from sft_jax.train import bench  # pylint: disable=g-import-not-at-top
    from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg_over, rest = config_lib.split_argv(argv[1:])
    cfg = config_lib.load_config(rest[1], cfg_over)
    result = bench.run(cfg, steps=steps, warmup=1)
    return dict(result, row=name, status="ok",
                wall_s=round(time.perf_counter() - start, 1))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    try:
      proc = subprocess.run(
          [sys.executable, "-m", "sft_jax"] + argv + ["--out", out],
          cwd=_ROOT, capture_output=True, text=True, timeout=timeout_s,
          check=False)
    except subprocess.TimeoutExpired:
      return dict(row=name, status=f"failed: timeout after {timeout_s}s",
                  remat=overrides["remat"])
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode or not os.path.exists(out):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
      return dict(row=name, status=f"failed (exit {proc.returncode}): "
                  f"{tail[0][:160]}", remat=overrides["remat"], wall_s=wall)
    with open(out) as f:
      return dict(json.load(f), row=name, status="ok", wall_s=wall)


def _cell(row, key):
  if key == "peak_memory_gb":
    b = row.get("peak_memory_bytes")
    return f"{b / 2**30:.1f}" if b else "-"
  if key == "attention" and row.get(key):  # "attention auto on gpu -> X; ..."
    return row[key].split("-> ", 1)[-1].split(";")[0]
  if key == "mfu":
    return f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
  value = row.get(key)
  return "-" if value is None else str(value).replace("|", "/")


def markdown(rows, device: str, date: str) -> str:
  lines = [f"# Train-step benchmarks: {device}, {date}", "",
           "| " + " | ".join(_COLUMNS) + " |",
           "|" + "---|" * len(_COLUMNS)]
  lines += ["| " + " | ".join(_cell(r, k) for k in _COLUMNS) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", choices=("accelerator", "tiny"),
                 default="accelerator")
  p.add_argument("--only", default="",
                 help="run only rows whose name contains this text")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--budget-s", type=float, default=1e9,
                 help="start no row after this many seconds")
  p.add_argument("--row-timeout-s", type=int, default=600)
  p.add_argument("--out-dir", default=str(_ROOT / "experiments/benchmarks"))
  p.add_argument("--in-process", action="store_true",
                 help="run rows in this process (no isolation; for tests)")
  args = p.parse_args(argv)
  rows_spec = ACCELERATOR_ROWS if args.rows == "accelerator" else TINY_ROWS
  rows_spec = [r for r in rows_spec if args.only in r[0]]
  start = time.perf_counter()
  rows = []
  for name, config, overrides in rows_spec:
    if time.perf_counter() - start > args.budget_s:
      rows.append(dict(row=name, status="skipped: budget spent",
                       remat=overrides["remat"]))
      continue
    row = run_row(name, config, overrides, steps=args.steps,
                  timeout_s=args.row_timeout_s, isolate=not args.in_process)
    print(json.dumps({k: row.get(k) for k in _COLUMNS}), flush=True)
    rows.append(row)
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0].device_kind.replace(" ", "_")
  date = datetime.date.today().isoformat()
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = out_dir / f"{device}-{date}"
  stem.with_suffix(".json").write_text(json.dumps(
      {"device": device, "date": date, "rows": rows}, indent=2) + "\n")
  stem.with_suffix(".md").write_text(markdown(rows, device, date))
  print(f"wrote {stem}.json and {stem}.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
