"""`sft-jax bench`: speed of the train step for a config, printed as JSON.

Random weights of the config's architecture (model.hf_config when set, so a
preset benchmarks offline; else model.path's config.json) and a synthetic
packed batch: rows of several segments with ~60% of tokens supervised. The
step is the real one (`step.jit_train_step`), compiled ahead of time so the
compile is timed on its own.
"""

import argparse
import json
import statistics
import sys
import time

_DESCRIPTION = """\
Benchmark the train step of a config: tokens/s, MFU, peak memory, compile
time. Weights are random (model.hf_config, or model.path's config.json), the
batch is synthetic but packed like real data (several segments per row,
padding, ~60% supervised tokens). Prints one JSON object.

MFU counts model FLOPs the MaxText way with causal attention:
6 * N_matmul + 6 * L * T * H * K per token (unembedding included); LoRA uses
4 * N_matmul + attention + 6 * N_lora. MFU is null on devices without a known
peak (CPU). Any --config.KEY=VALUE overrides a config key.

"memory" gives the compiled step's argument / output / temp / generated-code
bytes per device; "collectives" the count, total and largest output bytes
per device of each collective kind in the compiled HLO (static: one inside
the layer loop counts once).
"""

_EPILOG = """\
examples:
  sft-jax bench --config configs/tiny.py
  sft-jax bench --config configs/presets/llama3_1b.py:method=lora \\
      --config.train.batch_size=8 --config.train.seq_len=4096 --steps 10
"""


def _parser():
  p = argparse.ArgumentParser(
      prog="sft-jax bench", description=_DESCRIPTION, epilog=_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="config file, e.g. configs/presets/llama3_1b.py")
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps after warmup (default 5, at least 1)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compiling (default 2)")
  p.add_argument("--out", metavar="FILE", help="also write the JSON here")
  return p


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int,
                    seed: int = 0, segments: int = 4,
                    num_sources: int = 1) -> dict:
  """A packed [B, T] batch: `segments` examples a row, then padding.

  Each example draws a random source id in [0, num_sources).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shape = (batch_size, seq_len)
  tokens = rng.integers(0, vocab_size, shape).astype(np.int32)
  targets = rng.integers(0, vocab_size, shape).astype(np.int32)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  source_id = np.zeros(shape, np.int32)
  for row in range(batch_size):
    used = int(seq_len * rng.uniform(0.9, 1.0))
    cuts = np.sort(rng.choice(np.arange(1, used), segments - 1, replace=False))
    for s, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used])):
      segment_ids[row, a:b] = s + 1
      positions[row, a:b] = np.arange(b - a)
      source_id[row, a:b] = rng.integers(0, num_sources)
  loss_mask = ((rng.random(shape) < 0.6) & (segment_ids > 0)).astype(
      np.float32)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
              segment_ids=segment_ids, positions=positions,
              source_id=source_id)


def run(cfg, steps: int = 5, warmup: int = 2) -> dict:
  """Benchmarks `cfg`'s train step on all devices; returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from sft_jax import models  # pylint: disable=g-import-not-at-top
  from sft_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import hlo_stats  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg.model.init = "random"
  if cfg.model.hf_config:
    cfg.model.path = ""
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, state_shardings = step_lib.init_train_state(cfg, model_cfg,
                                                     variables, mesh)
  del variables
  report = step_lib.param_report(cfg, model_cfg, state)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  batch = sharding.global_batch(
      synthetic_batch(b, t, model_cfg.vocab_size, cfg.seed), mesh)
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, state_shardings)

  start = time.perf_counter()
  lowered = train_step.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)

  devices = mesh.devices.size
  kind = jax.devices()[0].device_kind
  trainable_matmul = 0
  if cfg.method.name == "freeze":
    trainable_matmul = report["trainable_params"]
  per_token = flops_lib.flops_per_token(model_cfg, t, cfg.method.name,
                                        trainable_matmul)
  tokens_per_s = b * t / step_s
  peak = flops_lib.peak_flops(kind)
  mfu = per_token * tokens_per_s / (peak * devices) if peak else None
  stats = jax.devices()[0].memory_stats() or {}
  memory = compiled.memory_analysis()
  return {
      "device": kind,
      "num_devices": devices,
      "mesh": dict(mesh.shape),
      "model_type": model_cfg.model_type,
      "method": cfg.method.name,
      "dtype": cfg.model.dtype,
      "param_dtype": cfg.model.param_dtype,
      "remat": cfg.model.remat,
      "attention": models.attention_summary(model_cfg),
      "batch_size": b,
      "seq_len": t,
      "grad_accum": cfg.train.grad_accum,
      **report,
      "loss": float(metrics["loss"]),
      "compile_s": round(lower_s + compile_s, 3),
      "lower_s": round(lower_s, 3),
      "step_s": round(step_s, 5),
      "tokens_per_s": round(tokens_per_s, 1),
      "tokens_per_s_per_device": round(tokens_per_s / devices, 1),
      "supervised_fraction": round(float(metrics["num_supervised_tokens"])
                                   / (b * t), 4),
      "flops_per_token": per_token,
      "peak_flops_per_device": peak,
      "mfu": round(mfu, 4) if mfu is not None else None,
      "peak_memory_bytes": stats.get("peak_bytes_in_use"),
      "compiled_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
      "compiled_argument_bytes": getattr(memory, "argument_size_in_bytes",
                                         None),
      "memory": hlo_stats.memory(compiled),
      "collectives": hlo_stats.collectives(compiled.as_text()),
  }


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  overrides, rest = config_lib.split_argv(argv)
  parser = _parser()
  args = parser.parse_args(rest)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  cfg = config_lib.load_config(args.config, overrides)
  from sft_jax.train import validate  # pylint: disable=g-import-not-at-top
  validate.validate(cfg, sources=False)  # values, before compiling anything
  result = run(cfg, steps=args.steps, warmup=args.warmup)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0
