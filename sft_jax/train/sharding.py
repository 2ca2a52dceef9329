"""The device mesh and logical-axis sharding rules.

The mesh has three axes: "data" (pure data parallelism: params replicated),
"fsdp" (data parallelism with params, grads and optimizer state sharded) and
"tensor" (tensor parallelism over heads / MLP / vocab). Arrays are tagged with
logical axis names (see `sft_jax.models.logical_axes`) and the config's
`sharding.rules` map each name to mesh axes, so one table shards every tree.
"""

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: config_dict.ConfigDict,
               num_devices: int) -> tuple[int, int, int]:
  """Resolves (data, fsdp, tensor) sizes; at most one may be -1 (= the rest)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be "
                     "positive, with at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} "
                       f"devices are not a multiple of {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, {num_devices} available")
  return tuple(sizes)


def make_mesh(mesh_cfg: config_dict.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") over `devices` (default all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules_from_config(rules_cfg: config_dict.ConfigDict
                      ) -> dict[str, tuple[str, ...]]:
  """{"embed": "fsdp", "batch": "data,fsdp"} -> {"embed": ("fsdp",), ...}."""
  rules = {}
  for name, axes in rules_cfg.items():
    axes = tuple(a.strip() for a in axes.split(",") if a.strip())
    for a in axes:
      if a not in MESH_AXES:
        raise ValueError(f"sharding.rules.{name}: unknown mesh axis {a!r} "
                         f"(mesh axes are {MESH_AXES})")
    rules[name] = axes
  return rules


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int],
                    mesh: jax.sharding.Mesh,
                    rules: dict[str, tuple[str, ...]]) -> P:
  """PartitionSpec of an array with `shape` tagged with `logical` axis names.

  A mesh axis is used at most once per array (first dimension wins) and only
  where it divides the dimension, so e.g. 2 kv heads on a 4-way tensor axis
  stay replicated instead of failing.
  """
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape "
                     f"{tuple(shape)}")
  used, spec = set(), []
  for name, dim in zip(logical, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule "
                       f"(known: {sorted(rules)})")
    chosen = []
    for axis in rules.get(name, ()) if name is not None else ():
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else
                (chosen[0] if chosen else None))
  return P(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str)
                                      for a in x)


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: jax.sharding.Mesh,
                   rules: dict[str, tuple[str, ...]]) -> Any:
  """NamedShardings for `shape_tree` (arrays or ShapeDtypeStructs).

  `logical_tree` has the same structure with a tuple of logical names per
  leaf (as from `models.logical_axes`).
  """
  return jax.tree.map(
      lambda axes, x: NamedSharding(
          mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      logical_tree, shape_tree, is_leaf=_is_axes)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over ("data", "fsdp"), every other dimension replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def batch_shardings(mesh: jax.sharding.Mesh,
                    keys: Sequence[str] = ("tokens", "targets", "loss_mask",
                                           "segment_ids", "positions",
                                           "source_id")
                    ) -> dict[str, NamedSharding]:
  """{key: sharding} for a [B, T] batch dict: rows over (data, fsdp)."""
  return {k: batch_sharding(mesh) for k in keys}


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
  """Sorted rows of a [batch_size, ...] global batch this process must feed.

  Rows come from the batch sharding's addressable indices, so processes whose
  devices hold replicas of one batch shard (a tensor axis spanning hosts)
  read the same rows, and a batch axis spanning hosts splits them.
  """
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map(
      (batch_size,))
  rows = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(batch_size)))
  return np.asarray(sorted(rows), np.int64)


def _global_rows(local_rows: int, mesh: jax.sharding.Mesh) -> int:
  """The global batch size whose `process_rows` has `local_rows` rows."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  mine = len(process_rows(mesh, shards))
  return local_rows * shards // mine


def global_batch(local_batch: dict[str, np.ndarray],
                 mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global [B, T] arrays from this process's rows (`process_rows` order).

  `local_batch` holds the rows `process_rows(mesh, B)` names, in that order;
  each device takes its slice of them, so any device order works.
  """
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    b = _global_rows(v.shape[0], mesh)
    rows = process_rows(mesh, b)
    where = np.full(b, -1, np.int64)
    where[rows] = np.arange(len(rows))

    def piece(index, v=v, where=where, b=b):
      return v[(where[np.arange(b)[index[0]]],) + tuple(index[1:])]
    out[k] = jax.make_array_from_callback((b,) + v.shape[1:],
                                          batch_sharding(mesh, v.ndim), piece)
  return out
