"""`sft-jax plan`: will a run fit? Per-device memory before any step runs.

The train step is lowered and compiled ahead of time on ShapeDtypeStructs (no
weights are read or allocated), over a mesh of the target's device count:

  frozen_params, trainable_params, optimizer_state
      exact per-device bytes of each state part, from its shardings;
  gradients
      the trainable part in float32 (a part of step_temp, shown apart);
  step_temp
      the compiled step's temporaries (XLA memory analysis): gradients,
      saved activations at the configured remat and attention backend, the
      CE chunk's logits, workspace; activations = step_temp - gradients;
  eval_temp
      the compiled eval step's temporaries (when eval is configured);
  peak = state + batch + step outputs not aliased to the donated state +
      max(step_temp, eval_temp).

On CPU the target's device count is simulated (XLA host devices), so the
sharded figures are those of the target mesh; temporaries are the CPU
compiler's, which schedules and fuses differently from a GPU/TPU compiler
(compile on the target's platform for its own figure). `--measure` runs the
step for real and reports the process's resident-memory growth next to the
prediction (meaningful on one CPU device).
"""

import argparse
import json
import os
import sys
import threading

_EPILOG = """\
examples:
  sft-jax plan --config configs/tiny.py --measure
  sft-jax plan --config configs/presets/llama3_8b.py:method=qlora \\
      --devices 1 --device-kind H100 --config.train.batch_size=1 \\
      --config.train.grad_accum=1
"""

# Device memory in GiB by device-kind substring (first match wins).
DEVICE_MEMORY_GIB = (
    ("GH200", 96), ("H200", 141), ("H100", 80), ("A100-SXM4-40GB", 40),
    ("A100-PCIE-40GB", 40),
    ("A100", 80), ("L40", 48), ("L4", 24), ("A10", 24), ("4090", 24),
    ("3090", 24), ("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v5p", 95),
    ("TPU v5", 95), ("TPU v6", 32), ("TPU v4", 32))
_GIB = 1024 ** 3


def device_memory(kind: str) -> int | None:
  for key, gib in DEVICE_MEMORY_GIB:
    if key.lower() in kind.lower():
      return gib * _GIB
  return None


def _per_device(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def plan(cfg, memory_bytes: int | None = None, devices=None) -> dict:
  """The per-device breakdown of `cfg`'s run over `devices` (default all)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(cfg.mesh, devices)
  model_cfg = model_setup.model_config(cfg)
  shapes, shardings = model_setup.variable_shardings(cfg, model_cfg, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)
  state, state_shardings = step_lib.abstract_train_state(cfg, abstract, mesh)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask"
                                   else jnp.int32, sharding=batch_sharding)
           for k in ("tokens", "targets", "positions", "segment_ids",
                     "loss_mask")}
  compiled = step_lib.jit_train_step(cfg, model_cfg, mesh, state_shardings
                                     ).lower(state, batch).compile()
  train_mem = compiled.memory_analysis()
  eval_temp = 0
  if cfg.eval.every_steps > 0:
    eb = cfg.eval.batch_size
    eval_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((eb, t), x.dtype, sharding=x.sharding),
        batch)
    eval_temp = step_lib.jit_eval_step(
        cfg, model_cfg, mesh, state_shardings).lower(
            state, eval_batch).compile().memory_analysis().temp_size_in_bytes

  grads = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
      state.trainable)
  parts = {
      "frozen_params": _per_device(state.frozen),
      "trainable_params": _per_device(state.trainable),
      "optimizer_state": _per_device(state.opt_state),
      "batch": _per_device(batch),
  }
  temp = train_mem.temp_size_in_bytes
  parts["gradients"] = _per_device(grads)
  parts["activations_and_workspace"] = max(0, temp - parts["gradients"])
  parts["step_temp"] = temp
  parts["eval_temp"] = eval_temp
  state_bytes = (parts["frozen_params"] + parts["trainable_params"]
                 + parts["optimizer_state"] + _per_device(state.step))
  outputs = max(0, train_mem.output_size_in_bytes
                - train_mem.alias_size_in_bytes)
  peak = state_bytes + parts["batch"] + outputs + max(temp, eval_temp)
  kind = jax.devices()[0].device_kind
  return {
      "device_kind": kind,
      "num_devices": mesh.devices.size,
      "mesh": dict(mesh.shape),
      "method": cfg.method.name,
      "param_dtype": cfg.model.param_dtype,
      "trainable_dtype": cfg.model.trainable_dtype,
      "optimizer": cfg.optim.name,
      "remat": cfg.model.remat,
      "attention": cfg.model.attention,
      "batch_size": b, "seq_len": t, "grad_accum": cfg.train.grad_accum,
      "per_device_bytes": parts,
      "compiled": {"argument": train_mem.argument_size_in_bytes,
                   "output": train_mem.output_size_in_bytes,
                   "alias": train_mem.alias_size_in_bytes,
                   "temp": temp},
      "predicted_peak_bytes": peak,
      "device_memory_bytes": memory_bytes,
      "fits": None if memory_bytes is None else peak <= memory_bytes,
  }


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg, steps: int = 1, devices=None) -> int:
  """Peak resident-memory growth (bytes) over creating the state and
  running `steps` train steps, after compiling: the CPU's measured peak.

  One step by default: on CPU the growth keeps rising over later steps
  (allocator reuse, not live buffers), which no prediction models.
  """
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sft_jax.train import bench  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(cfg.mesh, devices)
  model_cfg = model_setup.model_config(cfg)
  shapes, shardings = model_setup.variable_shardings(cfg, model_cfg, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)
  abstract_state, state_shardings = step_lib.abstract_train_state(
      cfg, abstract, mesh)
  host_batch = bench.synthetic_batch(cfg.train.batch_size, cfg.train.seq_len,
                                     model_cfg.vocab_size, cfg.seed)
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, state_shardings)
  abstract_batch = {k: jax.ShapeDtypeStruct(
      v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in host_batch.items()}
  compiled = train_step.lower(abstract_state, abstract_batch).compile()
  gc.collect()
  base = _rss()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss())
      done.wait(0.0005)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  # Zeros, not real weights: the same buffers, with no init program compiled
  # or run inside the measured window.
  state = jax.tree.map(
      lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding),
      abstract_state)
  batch = sharding.global_batch(host_batch, mesh)
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  done.set()
  sampler.join()
  return peak[0] - base


def _parser():
  p = argparse.ArgumentParser(
      prog="sft-jax plan", description=__doc__.split("\n\n", 1)[1],
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="config file, e.g. configs/presets/llama3_8b.py")
  p.add_argument("--devices", type=int, metavar="N",
                 help="target device count (CPU: simulated; default: all "
                      "local devices)")
  p.add_argument("--device-kind", metavar="KIND",
                 help="target device, for its memory: " + ", ".join(
                     k for k, _ in DEVICE_MEMORY_GIB))
  p.add_argument("--device-memory-gib", type=float, metavar="GIB",
                 help="target device memory (overrides --device-kind)")
  p.add_argument("--measure", action="store_true",
                 help="also run one step and report the measured resident-"
                      "memory growth (CPU)")
  p.add_argument("--out", metavar="FILE", help="also write the JSON here")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  overrides, rest = config_lib.split_argv(argv)
  parser = _parser()
  args = parser.parse_args(rest)
  if args.devices is not None:
    if args.devices < 1:
      parser.error("--devices must be >= 1")
    # Before jax starts: simulated host devices (only CPU uses them).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={args.devices}")
  memory = None
  if args.device_memory_gib:
    memory = int(args.device_memory_gib * _GIB)
  elif args.device_kind:
    memory = device_memory(args.device_kind)
    if memory is None:
      parser.error(f"--device-kind {args.device_kind!r}: unknown; pass "
                   "--device-memory-gib")
  try:
    cfg = config_lib.load_config(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"sft-jax plan: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  if args.devices is not None and len(jax.devices()) < args.devices:
    print(f"sft-jax plan: --devices {args.devices}: only "
          f"{len(jax.devices())} {jax.devices()[0].platform} devices here",
          file=sys.stderr)
    return 2
  devices = jax.devices()[:args.devices] if args.devices else None
  cfg.model.init = "random"
  if cfg.model.hf_config:
    cfg.model.path = ""
  if memory is None:
    stats = jax.devices()[0].memory_stats() or {}
    memory = stats.get("bytes_limit")
  result = plan(cfg, memory, devices)
  if args.measure:
    result["measured_peak_growth_bytes"] = measure(cfg, devices=devices)
    result["note"] = ("measured: resident-memory growth over creating the "
                      "state and running one step (CPU)")
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0
