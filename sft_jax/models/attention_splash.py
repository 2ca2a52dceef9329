"""`splash`: TPU Pallas splash attention with segment ids (train mode).

jax.experimental.pallas.ops.tpu.splash_attention computes softmax(q k^T)
v over [H, T, D] for one row, with a static mask (CausalMask, or LocalMask
for a sliding window), `SegmentIds` for packing, the logit soft-cap and
native GQA (H query heads over N kv heads). It does not scale q, so q is
pre-scaled. Rows are vmapped; when a mesh is set (jax.set_mesh, or the
abstract mesh the train and eval steps are traced under) the call runs under
shard_map with the batch over "data"/"fsdp" and heads over
"tensor", so each device runs the kernel on its own rows and heads.

Off TPU the kernel runs in Pallas interpret mode: slow, but the same
program, which is how CI checks it against the reference.

Padding: T is padded to a multiple of 128 with segment 0. Splash has no
"key segment 0 is empty" rule, so padding queries see padding keys; that
keeps their softmax finite, and real queries (segment >= 1) never see them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

_BLOCK = 128  # splash blocks are multiples of 128 that divide T.
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def _block_size(t: int) -> int:
  for size in (512, 256, 128):
    if t % size == 0:
      return size
  raise AssertionError(t)


def _kernel(h: int, t: int, window, softcap, interpret: bool):
  """A splash kernel for one row of H heads and T (padded) tokens."""
  if window is not None and not isinstance(window, int):
    raise ValueError("splash needs a static (Python int) window; the layer "
                     "stack passes one per attention pattern")
  if window and window > 0:
    mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  else:
    mask = splash.CausalMask((t, t))
  block = _block_size(t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block,
                            block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block,
                            use_fused_bwd_kernel=True)
  return splash.make_splash_mha(
      splash.MultiHeadMask([mask] * h), block_sizes=sizes, head_shards=1,
      q_seq_shards=1, attn_logits_soft_cap=softcap or None,
      interpret=interpret)


def _local(q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, seg_BxT, *, window, softcap,
           interpret):
  kernel = _kernel(q_BxHxTxK.shape[1], q_BxHxTxK.shape[2], window, softcap,
                   interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(
      q_BxHxTxK, k_BxNxTxK, v_BxNxTxK, seg_BxT)


def _mesh_axes(b: int, h: int, n: int):
  """(batch axes, head axis) of the current mesh that divide the shapes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  names = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch, size = [], 1
  for a in _BATCH_AXES:
    if a in names and b % (size * names[a]) == 0:
      batch.append(a)
      size *= names[a]
  head = (_HEAD_AXIS if _HEAD_AXIS in names and h % names[_HEAD_AXIS] == 0
          and n % names[_HEAD_AXIS] == 0 else None)
  return mesh, tuple(batch) or None, head


def splash_attention(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                     kv_pos_BxS, kv_seg_BxS, *, window, softcap, scale, mode,
                     interpret: bool | None = None):
  """Train-mode attention by the splash kernel; same numbers as xla."""
  del q_pos_BxT, kv_pos_BxS, kv_seg_BxS  # train mode: keys are the queries
  if mode != "train":
    raise ValueError("splash implements train mode only")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  b, t, h, d = q_BxTxHxK.shape
  n = k_BxSxNxK.shape[2]
  tp = -(-t // _BLOCK) * _BLOCK

  def to_heads_first(x):  # [B, T, X, K] -> [B, X, Tp, K]
    x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2)

  q = to_heads_first(q_BxTxHxK * jnp.asarray(scale, q_BxTxHxK.dtype))
  k, v = to_heads_first(k_BxSxNxK), to_heads_first(v_BxSxNxK)
  seg = jnp.pad(q_seg_BxT.astype(jnp.int32), ((0, 0), (0, tp - t)))
  fn = functools.partial(_local, window=window, softcap=softcap,
                         interpret=interpret)
  axes = _mesh_axes(b, h, n)
  if axes is not None:
    mesh, batch, head = axes
    spec = P(batch, head, None, None)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec,
                                                P(batch, None)),
                       out_specs=spec, check_vma=False)
  out_BxHxTxK = fn(q, k, v, seg)
  return jnp.swapaxes(out_BxHxTxK, 1, 2)[:, :t].astype(q_BxTxHxK.dtype)


IMPLEMENTATIONS = {"splash": splash_attention}
