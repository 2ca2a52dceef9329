"""Host memory of loading a checkpoint into shards, and tokenize throughput.

  python scripts/measure_ingest.py write /tmp/ckpt_1b      # random Llama-3.2-1B shapes
  python scripts/measure_ingest.py load /tmp/ckpt_1b --devices 8 --fsdp 8
  python scripts/measure_ingest.py tokenize --records 30000 --workers 1,0 --repeat 3

`write` stores a random bfloat16 checkpoint of the Llama-3.2-1B architecture
(1.24B parameters), one safetensors file per layer so writing it stays small.
`load` runs `models.load_hf` into a (data=1, fsdp, tensor) mesh of simulated
CPU devices and prints one JSON line: the host's peak resident memory above
the level just before loading, next to the loaded parameters' bytes (on CPU
the "devices" live in host memory too, so peak - result is the transient
host cost; anon_* leaves out file pages mapped while reading, which the
kernel can drop). `tokenize` times `data.prepare_source` on synthetic chat records
with each worker count (0 = the default, chosen from the CPUs and the source
size), `--repeat` times in alternation, a fresh cache each time, and checks
every cache is byte-identical to the first.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time

_HF = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
           intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, head_dim=64,
           rms_norm_eps=1e-5, max_position_embeddings=8192,
           tie_word_embeddings=True, rope_theta=500000.0,
           torch_dtype="bfloat16")


def _write(out):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(0)
  d, f, v = _HF["hidden_size"], _HF["intermediate_size"], _HF["vocab_size"]
  h, n, k = 32, 8, 64
  rand = lambda *s: (rng.standard_normal(s, np.float32) * 0.02).astype(
      ml_dtypes.bfloat16)
  weight_map, total = {}, 0
  files = [("model-embed.safetensors", {
      "model.embed_tokens.weight": rand(v, d),
      "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)})]
  for i in range(_HF["num_hidden_layers"]):
    p = f"model.layers.{i}."
    files.append((f"model-layer{i:02d}.safetensors", {
        p + "self_attn.q_proj.weight": rand(h * k, d),
        p + "self_attn.k_proj.weight": rand(n * k, d),
        p + "self_attn.v_proj.weight": rand(n * k, d),
        p + "self_attn.o_proj.weight": rand(d, h * k),
        p + "mlp.gate_proj.weight": rand(f, d),
        p + "mlp.up_proj.weight": rand(f, d),
        p + "mlp.down_proj.weight": rand(d, f),
        p + "input_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
        p + "post_attention_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
    }))
  for name, tensors in files:
    safetensors.numpy.save_file(tensors, os.path.join(out, name),
                                metadata={"format": "pt"})
    for t, x in tensors.items():
      weight_map[t] = name
      total += x.nbytes
    del tensors
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              fh)
  with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump(_HF, fh)
  print(json.dumps({"dir": out, "bytes": total}))


def _rss_bytes(field="VmRSS"):
  """Resident bytes; RssAnon leaves out file pages mapped while reading."""
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _load(path, devices, fsdp, tensor):
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                             f"{devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from sft_jax import models  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
  from configs import base  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config_dict.ConfigDict(
      dict(data=1, fsdp=fsdp, tensor=tensor)))
  rules = sharding.rules_from_config(base.get_config().sharding.rules)
  cfg = models.ModelConfig.from_hf_config(_HF)
  cfg = cfg.__class__(**{**cfg.__dict__, "param_dtype": "bfloat16"})
  shapes = models.param_shapes(cfg)
  axes = models.logical_axes(cfg)["params"]
  shardings = sharding.tree_shardings(axes, shapes, mesh, rules)
  jax.block_until_ready(jax.numpy.zeros(1))
  base_rss, peak = _rss_bytes(), [0]
  base_anon, peak_anon = _rss_bytes("RssAnon"), [0]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      peak_anon[0] = max(peak_anon[0], _rss_bytes("RssAnon"))
      time.sleep(0.005)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start = time.perf_counter()
  _, params = models.load_hf(path, dtype="bfloat16", shardings=shardings)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  peak[0] = max(peak[0], _rss_bytes())
  result = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  print(json.dumps({
      "devices": devices, "mesh": dict(mesh.shape), "load_s": round(seconds, 2),
      "result_bytes": result, "largest_leaf_bytes": largest,
      "peak_rss_above_start_bytes": peak[0] - base_rss,
      "transient_bytes": peak[0] - base_rss - result,
      "anon_transient_bytes": peak_anon[0] - base_anon - result,
      "ru_maxrss_bytes": resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _cpu_seconds():
  """This process's user + system seconds (the workers are the fork
  server's children, not counted)."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  return own.ru_utime + own.ru_stime


def _tokenize(records, workers_list, repeat):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      __file__)), "tests"))
  import tiny_tok  # pylint: disable=g-import-not-at-top
  from sft_jax import data  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp()
  tiny_tok.make_tokenizer(os.path.join(tmp, "tok"))
  tok = data.load_tokenizer(os.path.join(tmp, "tok"))
  words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
  path = os.path.join(tmp, "train.jsonl")
  with open(path, "w") as fh:
    for i in range(records):
      q = " ".join(words[(i + j) % len(words)] for j in range(20))
      a = " ".join(words[(i * 3 + j) % len(words)] for j in range(40))
      fh.write(json.dumps({"messages": [
          {"role": "user", "content": q},
          {"role": "assistant", "content": a}]}) + "\n")
  from sft_jax.data import cache  # pylint: disable=g-import-not-at-top
  src = data.source_config(path=path)
  reference = None
  for n in range(repeat):
    for workers in workers_list:
      cfg = data.default_config()
      cfg.cache_dir = os.path.join(tmp, f"cache{workers}-{n}")
      cfg.tokenize_workers = workers
      cpu = _cpu_seconds()
      start = time.perf_counter()
      p = data.prepare_source("train", src, cfg, tok, seq_len=512)
      seconds = time.perf_counter() - start
      cpu = round(_cpu_seconds() - cpu, 1)
      entry = p.tokenized.cache_path
      files = {f: open(os.path.join(entry, f), "rb").read()
               for f in sorted(os.listdir(entry))}
      reference = reference or files
      print(json.dumps({
          "workers": workers, "used": cache.resolve_workers(workers, src),
          "records": records, "examples": int(len(p.keep)),
          "seconds": round(seconds, 2),
          "records_per_s": round(records / seconds, 1),
          "cpu_s_parent": cpu,
          "identical_to_first": files == reference}), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  w = sub.add_parser("write")
  w.add_argument("dir")
  l = sub.add_parser("load")
  l.add_argument("dir")
  l.add_argument("--devices", type=int, default=8)
  l.add_argument("--fsdp", type=int, default=8)
  l.add_argument("--tensor", type=int, default=1)
  t = sub.add_parser("tokenize")
  t.add_argument("--records", type=int, default=20000)
  t.add_argument("--workers", default="1,0",
                 help="worker counts to compare (0 = the default, auto)")
  t.add_argument("--repeat", type=int, default=1)
  args = p.parse_args()
  if args.cmd == "write":
    _write(args.dir)
  elif args.cmd == "load":
    _load(args.dir, args.devices, args.fsdp, args.tensor)
  else:
    _tokenize(args.records, [int(x) for x in args.workers.split(",")],
              args.repeat)


if __name__ == "__main__":
  main()
