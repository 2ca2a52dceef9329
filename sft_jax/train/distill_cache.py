"""`sft-jax distill-cache`: the offline teacher's top-k log-probs, computed once.

  sft-jax distill-cache --config CFG --out DIR [--config.KEY=VALUE ...]

Runs `distill.teacher` over every row the training pipeline of CFG can draw
(each training source tokenized and fitted to train.seq_len exactly as
training does) and writes the teacher's `distill.top_k` most likely next
tokens and their log-probs per position to DIR (layout:
sft_jax/data/teacher_cache.py). Train with --config.distill.cache=DIR.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from sft_jax import data
from sft_jax import models
from sft_jax.data import pipeline
from sft_jax.data import teacher_cache
from sft_jax.train import config as config_lib
from sft_jax.train import distill
from sft_jax.train import distill_loss
from sft_jax.train import sharding


def _topk_fn(teacher_cfg, k: int, chunk: int):
  model = models.Transformer(teacher_cfg)

  @jax.jit
  def fn(params, tokens, positions, segment_ids):
    hidden = model.apply({"params": params}, tokens, positions, segment_ids,
                         return_hidden=True)
    return distill_loss.teacher_topk_logp(
        hidden, models.unembedding(params, teacher_cfg),
        lambda h, w: models.logits_from_hidden(h, w, teacher_cfg), k, chunk)
  return fn


def build(cfg, out_dir: str, *, batch_size: int = 8) -> dict:
  """Writes the cache of `cfg`'s training sources to `out_dir`; its meta."""
  k = cfg.distill.top_k
  if k <= 0:
    raise config_lib.ConfigError("config distill.top_k must be > 0 for an "
                                 "offline cache (full-vocabulary log-probs "
                                 "per position would not fit on disk)")
  if not cfg.distill.teacher:
    raise config_lib.ConfigError("config distill.teacher is empty: name the "
                                 "teacher whose outputs to cache")
  online = config_dict.ConfigDict(cfg.to_dict())
  online.distill.cache = ""  # What is being built cannot be read yet.
  distill.check_config(online)
  tok_path = cfg.data.tokenizer or cfg.model.path
  if not tok_path:
    raise config_lib.ConfigError("config: set data.tokenizer (or model.path)")
  tok = data.load_tokenizer(tok_path, cfg.data.chat_template or None)
  seq_len = cfg.train.seq_len
  mesh = sharding.make_mesh(cfg.mesh)
  params = distill.load_teacher(cfg, mesh)
  teacher_cfg = distill.teacher_model_config(cfg)
  fn = _topk_fn(teacher_cfg, k, cfg.train.ce_chunk)
  out_dir = os.path.expanduser(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, teacher_cache.META)
  if os.path.exists(meta_path):
    # Written last: until the new cache is complete the directory is no cache.
    os.remove(meta_path)
  meta = {"top_k": k, "vocab_size": teacher_cfg.vocab_size,
          "seq_len": seq_len, "teacher": cfg.distill.teacher, "sources": {}}
  for sid, name in enumerate(data.source_names(cfg.data)):
    p = pipeline.prepare_source(name, cfg.data.sources[name], cfg.data, tok,
                                seq_len=seq_len)
    load = pipeline.example_loader(p, sid, seq_len, cfg.data.too_long,
                                   tok.bos_token_id)
    writer = teacher_cache.SourceWriter(out_dir, name, p.rows)
    # Rows per call: a multiple of the mesh's batch shards.
    b = -(-batch_size // sharding.batch_sharding(mesh).num_devices) * (
        sharding.batch_sharding(mesh).num_devices)
    for start in range(0, len(p.rows), b):
      examples = [load(r) for r in p.rows[start:start + b]]
      arrays = {key: np.zeros((b, seq_len), np.int32)
                for key in ("tokens", "positions", "segment_ids")}
      for i, ex in enumerate(examples):
        n = len(ex["tokens"])
        arrays["tokens"][i, :n] = ex["tokens"]
        arrays["positions"][i, :n] = np.arange(n)
        arrays["segment_ids"][i, :n] = 1
      batch = sharding.global_batch(arrays, mesh)
      ids, logp = jax.device_get(fn(params, batch["tokens"],
                                    batch["positions"], batch["segment_ids"]))
      for i, ex in enumerate(examples):
        n = len(ex["tokens"])
        writer.add(ids[i, :n], logp[i, :n])
    writer.close()
    meta["sources"][name] = {
        "tokenized": os.path.basename(p.tokenized.cache_path),
        "rows": int(len(p.rows))}
    print(f"distill-cache: source {name!r}: {len(p.rows)} rows", flush=True)
  with open(meta_path, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  return meta


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = config_lib.split_argv(argv)
  p = argparse.ArgumentParser(
      prog="sft-jax distill-cache",
      description=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="the training config (data, train.seq_len, distill)")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="cache directory to write (then distill.cache=DIR)")
  p.add_argument("--batch-size", type=int, default=8,
                 help="rows per teacher forward pass (default: 8)")
  args = p.parse_args(rest)
  try:
    cfg = config_lib.load_config(args.config, overrides)
    build(cfg, args.out, batch_size=args.batch_size)
  except (config_lib.ConfigError, data.DataError) as e:
    print(f"sft-jax distill-cache: {e}", file=sys.stderr)
    return 2
  print(f"distill-cache: wrote {args.out}; train with "
        f"--config.distill.cache={args.out}")
  return 0
