"""HF safetensors checkpoints in and out, driven by tables.py.

Loading reads one tensor at a time (host memory: about one tensor beyond
the result), or with `shardings` only the slices each local device needs,
so every host of a multi-host job reads just its shard; a device's slice of
a stacked leaf is filled one layer at a time (host memory: that slice plus
one layer's part).
Saving gathers one layer at a time and only process 0 writes. Only safetensors are
read: no pickle, no remote code.
"""

import dataclasses
import functools
import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from sft_jax.models import tables
from sft_jax.models import transformer
from sft_jax.models.config import ModelConfig
from sft_jax.models.errors import (CheckpointError, MissingTensorError,
                                   ShapeMismatchError, UnexpectedTensorError)

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Files a model directory needs: config, weights, tokenizer, chat template.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt",
                "tokenizer*")


class _SafetensorsFile:
  """Reads tensors, or slices of them, straight from the file (memory-mapped,
  so only the touched bytes are read)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self.entries = header
    self._data_start = 8 + n

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def read(self, name: str, index=()) -> np.ndarray:
    entry = self.entries[name]
    if entry["dtype"] not in _DTYPES:
      raise CheckpointError(
          f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, _ = entry["data_offsets"]
    view = np.memmap(self.path, _DTYPES[entry["dtype"]], mode="r",
                     offset=self._data_start + begin,
                     shape=tuple(entry["shape"]))
    return np.array(view[index])


def resolve(path_or_hub_id: str) -> str:
  """A local directory, or a hub id downloaded with huggingface_hub."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id) or not re.fullmatch(
      r"[\w.-]+(/[\w.-]+)?", path_or_hub_id):
    raise CheckpointError(f"{path_or_hub_id}: not a checkpoint directory")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(
        path_or_hub_id, allow_patterns=list(HUB_PATTERNS))
  except Exception as e:  # offline, unknown repo, gated, network
    raise CheckpointError(
        f"{path_or_hub_id}: not a local directory, and downloading it from "
        f"the Hugging Face hub failed ({type(e).__name__}: {e}). Offline "
        "(HF_HUB_OFFLINE=1) only the local cache is searched.") from e


def _open_dir(local: str) -> dict[str, _SafetensorsFile]:
  """HF tensor name -> the file holding it."""
  index = os.path.join(local, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {fn: _SafetensorsFile(os.path.join(local, fn))
             for fn in sorted(set(weight_map.values()))}
    out = {}
    for fn, reader in files.items():
      for name in reader.entries:
        out[name] = reader
    for name, fn in weight_map.items():
      if name not in out:
        raise MissingTensorError(f"{index}: lists {name} in {fn}, which does "
                                 "not hold it")
    return out
  single = os.path.join(local, _SINGLE)
  if os.path.exists(single):
    reader = _SafetensorsFile(single)
    return {name: reader for name in reader.entries}
  found = sorted(os.listdir(local))
  raise CheckpointError(
      f"{local}: no {_SINGLE} or {_INDEX} (found {found}); only safetensors "
      "checkpoints are loaded (no pickle)")


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def param_shapes(cfg: ModelConfig):
  """ShapeDtypeStructs of the params tree (no LoRA), computing nothing."""
  base = dataclasses.replace(cfg, lora=None)
  return jax.eval_shape(functools.partial(transformer.init, base),
                        jax.random.key(0))["params"]


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, x, i):
  return stacked.at[i].set(x)


def load_hf(path_or_hub_id: str, *, dtype=None, shardings=None,
            leaf_fn=None):
  """Loads a HF safetensors checkpoint.

  Args:
    path_or_hub_id: a local directory or a hub id.
    dtype: param dtype to cast to (default: cfg.param_dtype, float32).
    shardings: optional pytree of jax.sharding.Sharding matching the params;
      each device's slice is read straight from the files.
    leaf_fn: optional fn(path, array) -> pytree applied to each param as
      soon as it is read (e.g. quantization), so the originals never coexist.

  Returns:
    (ModelConfig, params) with params as in transformer.py.
  """
  local = resolve(path_or_hub_id)
  # A truncated file or corrupt config.json: one line naming the file.
  from sft_jax import preflight  # pylint: disable=g-import-not-at-top
  preflight.check_model_dir(local, key=path_or_hub_id)
  config_path = os.path.join(local, "config.json")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: {e}") from e
  cfg = ModelConfig.from_hf_config(hf, source=config_path)
  if dtype is not None:
    cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
  shapes = _flatten(param_shapes(cfg))
  files = _open_dir(local)
  table = tables.Table(cfg.model_type, cfg.hf_wrapper)
  lm_head = table.hf_names("lm_head/kernel", 1)[0][0][0]

  for name, reader in files.items():
    if table.ignored(name):
      continue
    hit = table.match(name)
    if hit is None or hit[0] not in shapes or (
        hit[1] is not None and hit[1] >= cfg.num_layers):
      if cfg.tie_embeddings and name == lm_head:
        continue  # a tied copy; transformers ignores it too
      raise UnexpectedTensorError(
          f"{reader.path}: unexpected tensor {name} for a {cfg.model_type} "
          f"model as configured by {config_path}")

  plan = {}
  for path, sds in shapes.items():
    names, transform = table.hf_names(path, cfg.num_layers)
    want = sds.shape[1:] if names[0][1] is not None else sds.shape
    hf_shape = tuple(reversed(want)) if transform == "T" else tuple(want)
    for name, _ in names:
      if name not in files:
        raise MissingTensorError(
            f"{local}: missing tensor {name} (params {path}) required by "
            f"{config_path}")
      if files[name].shape(name) != hf_shape:
        raise ShapeMismatchError(
            f"{files[name].path}: tensor {name} has shape "
            f"{files[name].shape(name)}, {config_path} implies {hf_shape}")
    plan[path] = (names, transform)

  flat_shardings = {}
  if shardings is not None:
    flat_shardings = _flatten(shardings)
    if set(flat_shardings) != set(shapes):
      raise ValueError(
          f"load_hf({path_or_hub_id}): shardings do not match the params: "
          f"missing {sorted(set(shapes) - set(flat_shardings))}, extra "
          f"{sorted(set(flat_shardings) - set(shapes))}")
  out = {}
  for path, sds in shapes.items():
    names, transform = plan[path]
    dt = sds.dtype

    def read(name, index, transform=transform, dt=dt):
      hf_index = tuple(reversed(index)) if transform == "T" else index
      x = files[name].read(name, hf_index)
      return (x.T if transform == "T" else x).astype(dt)

    stacked = names[0][1] is not None
    if path in flat_shardings:
      def callback(index, names=names, stacked=stacked, read=read):
        if not stacked:
          return read(names[0][0], tuple(index))
        layers = range(cfg.num_layers)[index[0]]
        # Filled in place one layer at a time: the host holds this device's
        # shard plus one layer's slice, not a list of slices and their stack.
        shard = None
        for j, i in enumerate(layers):
          x = read(names[i][0], tuple(index[1:]))
          if shard is None:
            shard = np.empty((len(layers),) + x.shape, x.dtype)
          shard[j] = x
        return shard
      out[path] = jax.make_array_from_callback(sds.shape,
                                               flat_shardings[path], callback)
    elif stacked:
      leaf = jnp.zeros(sds.shape, dt)
      for name, i in names:
        leaf = _set_layer(leaf, read(name, ()), i)
      out[path] = leaf
    else:
      out[path] = jnp.asarray(read(names[0][0], ()))
    if leaf_fn is not None:
      out[path] = leaf_fn(path, out[path])
  return cfg, _unflatten(out)


def _size_bytes(size) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size))
  if not m:
    raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '5GB'")
  unit = m.group(2)
  base = 1024 if "i" in unit else 1000
  return int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def save_hf(cfg: ModelConfig, params, out_dir: str, *, dtype=None,
            max_shard_size="5GB") -> list[str]:
  """Writes config.json and safetensors (sharded above `max_shard_size`,
  with model.safetensors.index.json) that transformers loads.

  Args:
    cfg: the model config (runtime options are not saved).
    params: params tree (merge LoRA first with merge_lora).
    out_dir: created if needed.
    dtype: stored dtype (default cfg.param_dtype), e.g. "bfloat16".
    max_shard_size: bytes, or a string like "5GB" / "500MiB".

  Multi-host: call on every process (sharded leaves are gathered one layer
  at a time); only process 0 writes. Weight files of an earlier save in
  `out_dir` are replaced.

  Returns:
    The safetensors file names written.
  """
  dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  cfg = dataclasses.replace(cfg, hf_wrapper="")  # text-only model out
  table = tables.Table(cfg.model_type)
  flat = _flatten(params)
  expected = _flatten(param_shapes(cfg))
  if set(flat) != set(expected):
    raise CheckpointError(
        f"params do not match the config: missing "
        f"{sorted(set(expected) - set(flat))}, extra "
        f"{sorted(set(flat) - set(expected))}")
  entries = []  # (hf name, path, layer, transform, nbytes)
  for path, leaf in flat.items():
    names, transform = table.hf_names(path, cfg.num_layers)
    per = int(np.prod(leaf.shape[1:] if names[0][1] is not None
                      else leaf.shape)) * dtype.itemsize
    entries += [(name, path, i, transform, per) for name, i in names]
  limit = _size_bytes(max_shard_size)
  shards, size = [[]], 0
  for entry in entries:
    if shards[-1] and size + entry[4] > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += entry[4]

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):
      if old == _INDEX or re.fullmatch(
          r"model(-\d{5}-of-\d{5})?\.safetensors", old):
        os.remove(os.path.join(out_dir, old))
    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = hf_config["dtype"] = dtype.name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
  file_names = ([_SINGLE] if len(shards) == 1 else
                [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))])
  weight_map = {}
  for file_name, shard in zip(file_names, shards):
    tensors = {}
    for name, path, i, transform, _ in shard:
      # One layer on host at a time: the slice is taken on the devices, then
      # gathered (every process joins the gather; process 0 writes).
      x = _host_array(flat[path][i] if i is not None else flat[path])
      x = x.T if transform == "T" else x
      tensors[name] = np.ascontiguousarray(x.astype(dtype))
      weight_map[name] = file_name
    if writer:
      safetensors.numpy.save_file(tensors, os.path.join(out_dir, file_name),
                                  metadata={"format": "pt"})
  if writer and len(shards) > 1:
    total = sum(e[4] for e in entries)
    with open(os.path.join(out_dir, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": weight_map}, f, indent=2, sort_keys=True)
  return file_names
