#!/usr/bin/env python3
"""Train-step speed side by side: transformers + PyTorch vs sft_jax.

  python scripts/compare_torch.py                 # 7M Llama, 8 x 512, fp32
  python scripts/compare_torch.py --attention xla --steps 10

The same Llama shape and the same packed batches (bench.synthetic_batch:
several segments per row, padding, ~60% of tokens supervised) train with:
  torch:   LlamaForCausalLM, attn_implementation="sdpa" fed a block-diagonal
           causal 4D mask (so segments stay apart, as in sft_jax), AdamW,
           cross-entropy over supervised tokens only;
  sft_jax: the real train step (`sft-jax bench`'s), AdamW, masked CE.
Both in float32 on this machine's CPU threads. Prints tokens/s of each and
the ratio sft_jax / torch: medians of --steps steps after warmup, the two
frameworks' steps interleaved so that a shared machine's load hits both
alike (the per-step ratios are printed too).
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from sft_jax.train import bench
from sft_jax.train import config as config_lib

LLAMA_7M = dict(model_type="llama", vocab_size=8000, hidden_size=256,
                intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False)


def torch_step_fn(batch, lr: float):
  """A closure running one transformers + PyTorch train step."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  hf = dict(LLAMA_7M)
  hf.pop("model_type")
  config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(config).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999),
                          eps=1e-8, weight_decay=0.0)
  seg = torch.from_numpy(batch["segment_ids"]).long()
  t = seg.shape[1]
  idx = torch.arange(t)
  # Same segment, causal; padding attends to itself only (no empty rows).
  mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
          & (idx[None, :, None] >= idx[None, None, :]))
  mask |= torch.eye(t, dtype=torch.bool)[None]
  mask = mask[:, None]
  tokens = torch.from_numpy(batch["tokens"]).long()
  positions = torch.from_numpy(batch["positions"]).long()
  targets = torch.from_numpy(batch["targets"]).long()
  weights = torch.from_numpy(batch["loss_mask"])

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens, attention_mask=mask,
                   position_ids=positions).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
        reduction="none")
    loss = (nll * weights.reshape(-1)).sum() / weights.sum()
    loss.backward()
    opt.step()
    return float(loss)
  return step


def jax_step_fn(args):
  """(a closure running one sft_jax train step, the attention summary)."""
  import jax  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py", [
      f"--config.model.hf_config={json.dumps(LLAMA_7M)}",
      "--config.model.dtype=float32", "--config.model.param_dtype=float32",
      f"--config.model.attention={args.attention}",
      f"--config.model.remat={args.remat}", "--config.model.init=random",
      "--config.model.path=", "--config.method.name=full",
      "--config.optim.name=adamw", f"--config.optim.lr={args.lr}",
      "--config.optim.weight_decay=0.0",
      f"--config.train.batch_size={args.batch}",
      f"--config.train.seq_len={args.seq_len}",
      "--config.train.grad_accum=1", "--config.train.ce_chunk=512",
      "--config.mesh.fsdp=1", "--config.mesh.data=1"])
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


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="none")
  args = p.parse_args()
  batch = bench.synthetic_batch(args.batch, args.seq_len,
                                LLAMA_7M["vocab_size"], seed=0)
  jax_step, attention = jax_step_fn(args)
  torch_step = torch_step_fn(batch, args.lr)
  for _ in range(args.warmup):
    jax_step()
    torch_step()
  # Interleaved, so both see the same machine load.
  times = {"jax": [], "torch": []}
  for _ in range(args.steps):
    for name, fn in (("jax", jax_step), ("torch", torch_step)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  tokens = args.batch * args.seq_len
  ours = tokens / statistics.median(times["jax"])
  theirs = tokens / statistics.median(times["torch"])
  print(json.dumps({
      "shape": f"llama 7M, {args.batch}x{args.seq_len}, float32",
      "attention": attention, "cpu_threads": os.cpu_count(),
      "load_average": round(os.getloadavg()[0], 1),
      "torch_tokens_per_s": round(theirs, 1),
      "sft_jax_tokens_per_s": round(ours, 1),
      "ratio": round(ours / theirs, 3),
      "ratio_per_step": [round(t / j, 3) for j, t in zip(times["jax"],
                                                         times["torch"])]}))


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
