#!/usr/bin/env python3
"""Train-step speed side by side: transformers + PyTorch vs sft_jax.

  python scripts/compare_torch.py               # 7M Llama, 8 x 512, fp32, CPU
  python scripts/compare_torch.py --threads 0   # every core, each framework
  python scripts/compare_torch.py --attention xla --steps 20
  python scripts/compare_torch.py --device cuda --model 1b --batch 2 \
      --seq-len 4096                            # one NVIDIA GPU, bf16

The same Llama shape and the same packed batches (bench.synthetic_batch:
several segments per row, padding, ~60% of tokens supervised) train with:
  torch:   LlamaForCausalLM, attn_implementation="sdpa" fed a block-diagonal
           causal 4D mask (so segments stay apart, as in sft_jax), AdamW,
           cross-entropy over supervised tokens only;
  sft_jax: the real train step (`sft-jax bench`'s), AdamW, masked CE.
On the CPU both run in float32, in this one process, on the same --threads
CPU threads (default one; the process is pinned to that many cores before
either framework starts: XLA sizes its thread pool from the cores it may run
on, torch gets set_num_threads). sft_jax's layers run unrolled there
(model.scan_layers=False, as torch runs them; --layers scanned for the
default lax.scan, which copies each layer's saved activations into stacked
buffers). Before either framework starts, glibc malloc is told to keep freed
memory for reuse (--malloc reuse, the default: one arena, no mmap, no
trimming): by default both frameworks' large per-step buffers are mmapped
afresh and first-touched every step (page faults and zeroing: ~220k faults
per sft_jax step and ~130k per torch step on the 7M shape). The setting is
process-wide, so it applies to both alike; --malloc default leaves glibc as
it is. With --device cuda both run on the one GPU
in bfloat16 compute with float32 parameters and optimizer state (torch:
autocast; sft_jax: model.dtype=bfloat16, param_dtype=float32); JAX then
allocates on demand instead of taking most of the GPU up front, so the two
frameworks share it, and only wall time is meaningful.

What is measured: after --warmup steps each, --steps pairs of steps, the two
frameworks' steps interleaved (one sft_jax step, one torch step, ...) so a
shared machine's load hits both alike. Every step is timed twice: wall clock
and this process's CPU time (user + system, all threads). On a busy machine
wall time includes waiting for a core and swings with the other jobs; CPU
time counts only the work done, so its ratio is the steadier figure (it
still includes cache and memory-bandwidth contention). Printed: medians of
each, the ratios sft_jax / torch of the medians (> 1 = sft_jax faster), the
spread of the per-pair ratios (min, quartiles, max) and the load average at
start and end. Tokens/s = batch x seq_len / median step time.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import time

LLAMA_7M = dict(model_type="llama", vocab_size=8000, hidden_size=256,
                intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False)


# Llama-3.2-1B's shape (random weights).
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                rms_norm_eps=1e-5, rope_theta=500000.0,
                max_position_embeddings=8192, tie_word_embeddings=True)
MODELS = {"7m": LLAMA_7M, "1b": LLAMA_1B}


def torch_step_fn(batch, args):
  """A closure running one transformers + PyTorch train step."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if args.device == "cpu":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  hf = dict(MODELS[args.model])
  hf.pop("model_type")
  config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  dev = torch.device(args.device)
  model = transformers.LlamaForCausalLM(config).float().to(dev).train()
  autocast = torch.autocast(args.device, dtype=torch.bfloat16,
                            enabled=args.device == "cuda")
  opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                          eps=1e-8, weight_decay=0.0)
  seg = torch.from_numpy(batch["segment_ids"]).long()
  t = seg.shape[1]
  idx = torch.arange(t)
  # Same segment, causal; padding attends to itself only (no empty rows).
  mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
          & (idx[None, :, None] >= idx[None, None, :]))
  mask |= torch.eye(t, dtype=torch.bool)[None]
  mask = mask[:, None].to(dev)
  tokens = torch.from_numpy(batch["tokens"]).long().to(dev)
  positions = torch.from_numpy(batch["positions"]).long().to(dev)
  targets = torch.from_numpy(batch["targets"]).long().to(dev)
  weights = torch.from_numpy(batch["loss_mask"]).to(dev)

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      logits = model(input_ids=tokens, attention_mask=mask,
                     position_ids=positions).logits
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        reduction="none")
    loss = (nll * weights.reshape(-1)).sum() / weights.sum()
    loss.backward()
    opt.step()
    return loss.item()
  return step


def jax_step_fn(args):
  """(a closure running one sft_jax train step, the attention summary)."""
  # Imported here: main() pins the process's cores before jax starts.
  # pylint: disable=g-import-not-at-top
  import jax
  from sft_jax.train import bench
  from sft_jax.train import config as config_lib
  from sft_jax.train import model_setup
  from sft_jax.train import sharding
  from sft_jax.train import step as step_lib
  dtype = "bfloat16" if args.device == "cuda" else "float32"
  cfg = config_lib.load_config("configs/tiny.py", [
      f"--config.model.hf_config={json.dumps(MODELS[args.model])}",
      f"--config.model.dtype={dtype}", "--config.model.param_dtype=float32",
      f"--config.model.attention={args.attention}",
      f"--config.model.remat={args.remat}", "--config.model.init=random",
      "--config.model.path=", "--config.method.name=full",
      "--config.optim.name=adamw", f"--config.optim.lr={args.lr}",
      "--config.optim.weight_decay=0.0",
      f"--config.train.batch_size={args.batch}",
      f"--config.train.seq_len={args.seq_len}",
      "--config.train.grad_accum=1",
      f"--config.train.ce_chunk={args.ce_chunk}",
      "--config.mesh.fsdp=1", "--config.mesh.data=1",
      f"--config.model.scan_layers={_scanned(args)}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  batch = sharding.global_batch(
      bench.synthetic_batch(args.batch, args.seq_len, model_cfg.vocab_size,
                            seed=0), mesh)
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings)
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))
  from sft_jax import models  # pylint: disable=g-import-not-at-top
  summary = getattr(models, "attention_summary", None)  # older trees lack it
  return step, summary(model_cfg) if summary else model_cfg.attention_impl


def _scanned(args) -> bool:
  if args.layers == "auto":
    return args.device == "cuda"
  return args.layers == "scanned"


def _reuse_freed_memory() -> bool:
  """glibc malloc keeps freed memory for reuse; False if not glibc."""
  mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt",
                    None)
  if mallopt is None:
    return False
  m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
  settings = ((m_arena_max, 1), (m_mmap_max, 0),
              (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**28))
  return all(mallopt(param, value) == 1 for param, value in settings)


def _timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def _spread(xs):
  q = (statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1
       else xs * 3)
  return [round(x, 3) for x in (min(xs), q[0], q[2], max(xs))]


def main():
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog=__doc__[__doc__.index("What is measured"):],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  p.add_argument("--model", choices=sorted(MODELS), default="7m",
                 help="7m: D 256, 4 layers, V 8000; 1b: Llama-3.2-1B's shape")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=8,
                 help="timed steps of each framework, interleaved")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=1,
                 help="CPU threads for each framework (0 = every core this "
                      "process may use). One by default: on a shared "
                      "machine a busy core makes multi-threaded steps wait "
                      "on their slowest thread (torch's OpenMP most)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="none")
  p.add_argument("--ce-chunk", type=int, default=512)
  p.add_argument("--layers", choices=("auto", "unrolled", "scanned"),
                 default="auto",
                 help="sft_jax's layers: unrolled or lax.scan (auto: "
                      "unrolled on the CPU, scanned on a GPU)")
  p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                 help="CPU only: 'reuse' tells glibc malloc (for both "
                      "frameworks) to keep freed memory instead of "
                      "returning it to the system each step")
  args = p.parse_args()
  cores = sorted(os.sched_getaffinity(0))
  if args.threads < 0 or args.threads > len(cores):
    p.error(f"--threads {args.threads}: this process may use "
            f"{len(cores)} cores (0 = all of them)")
  if args.device == "cuda":
    # Both frameworks on one GPU: JAX must not take most of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("JAX_PLATFORMS", "cuda")
  else:
    if args.threads:
      # Before jax or torch start: both size their thread pools from this.
      os.sched_setaffinity(0, cores[:args.threads])
    if args.malloc == "reuse" and not _reuse_freed_memory():
      args.malloc = "default (not glibc)"
  from sft_jax.train import bench  # pylint: disable=g-import-not-at-top
  batch = bench.synthetic_batch(args.batch, args.seq_len,
                                MODELS[args.model]["vocab_size"], seed=0)
  load_start = os.getloadavg()[0]
  jax_step, attention = jax_step_fn(args)
  torch_step = torch_step_fn(batch, args)
  for _ in range(args.warmup):
    jax_step()
    torch_step()
  wall = {"jax": [], "torch": []}
  cpu = {"jax": [], "torch": []}
  for _ in range(args.steps):
    for name, fn in (("jax", jax_step), ("torch", torch_step)):
      w, c = _timed(fn)
      wall[name].append(w)
      cpu[name].append(c)
  tokens = args.batch * args.seq_len
  med = lambda xs: statistics.median(xs)
  per_pair = lambda d: [t / j for j, t in zip(d["jax"], d["torch"])]
  print(json.dumps({
      "shape": (f"llama {args.model}, {args.batch}x{args.seq_len}, "
                + ("bfloat16 compute" if args.device == "cuda"
                   else "float32")),
      "device": args.device,
      "attention": attention,
      "sft_jax_layers": "scanned" if _scanned(args) else "unrolled",
      "malloc": args.malloc if args.device == "cpu" else "default",
      "threads_each": len(os.sched_getaffinity(0)),
      "steps": args.steps,
      "load_average_start_end": [round(load_start, 1),
                                 round(os.getloadavg()[0], 1)],
      "sft_jax_tokens_per_s": round(tokens / med(wall["jax"]), 1),
      "torch_tokens_per_s": round(tokens / med(wall["torch"]), 1),
      "ratio_wall": round(med(wall["torch"]) / med(wall["jax"]), 3),
      "ratio_wall_spread": _spread(per_pair(wall)),
      "sft_jax_cpu_s_per_step": round(med(cpu["jax"]), 3),
      "torch_cpu_s_per_step": round(med(cpu["torch"]), 3),
      "ratio_cpu": round(med(cpu["torch"]) / med(cpu["jax"]), 3),
      "ratio_cpu_spread": _spread(per_pair(cpu)),
  }))


if __name__ == "__main__":
  main()
