"""Fused GPU attention that keeps packed segments in forward and backward.

Two kernels, both fed by pure-JAX adapters from segment ids (tested on CPU
against the reference mask; the kernels themselves need a GPU):

  tokamax  Mosaic GPU flash attention (tokamax >= 0.0.17, an optional extra:
           Python >= 3.12, jax >= 0.11.1). A query's visible keys are the
           index range [k_start, q] (`Mask(k_start, is_causal=True)`), where
           k_start is its segment's first token, or the window's first key if
           later. Soft-cap, GQA and sliding windows run in forward and
           backward on sm90/sm100.
  cudnn    cuDNN flash attention through jax's packed layout (q/kv offsets and
           seqlens per segment; Hopper or newer). No soft-cap.

Only train mode (index causality) maps onto these kernels.
"""

import functools

import jax
import jax.numpy as jnp

# Most segments one row may hold on the cuDNN path (offsets are [B, M+1]).
# A row with more makes that call's output NaN rather than wrong.
MAX_SEGMENTS = 64


def segment_starts(seg_BxT, window=None):
  """tokamax k_start [B, T]: the first key index each query may see.

  Segments are contiguous runs of one id (0 = padding). A padding query gets
  its own index, so it sees exactly itself and its softmax stays finite.
  """
  b, t = seg_BxT.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  new_run = jnp.concatenate(
      [jnp.ones((b, 1), bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(new_run, idx, 0), axis=1)
  start = jnp.where(seg_BxT == 0, idx, start)
  if isinstance(window, int) and window > 0:
    start = jnp.maximum(start, idx - window + 1)
  return start


def offsets_and_seqlens(seg_BxT, max_segments: int = MAX_SEGMENTS):
  """cuDNN packed layout: offsets [B, M+1] and seqlens [B, M], -1 padded.

  Returns (offsets, seqlens, count_B) where count_B is the number of
  segments found per row (may exceed M: then the row does not fit).
  """
  b, t = seg_BxT.shape
  idx = jnp.arange(t, dtype=jnp.int32)
  prev = jnp.concatenate([jnp.zeros((b, 1), seg_BxT.dtype), seg_BxT[:, :-1]],
                         axis=1)
  starts = (seg_BxT != prev) & (seg_BxT != 0)
  run = jnp.cumsum(starts, axis=1) - 1  # segment number of each token
  count_B = jnp.sum(starts, axis=1)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  slot = jnp.where(starts, run, max_segments + 1)  # out of range: dropped
  offsets = jnp.full((b, max_segments + 1), -1, jnp.int32).at[
      rows, slot].set(jnp.broadcast_to(idx, (b, t)), mode="drop")
  real = jnp.where(seg_BxT != 0, run, max_segments + 1)
  lengths = jnp.zeros((b, max_segments), jnp.int32).at[rows, real].add(
      1, mode="drop")
  seqlens = jnp.where(jnp.arange(max_segments)[None] < count_B[:, None],
                      lengths,
                      -1)
  return offsets, seqlens, count_B


def mask_from_starts(k_start_BxT):
  """The dense [B, T, T] mask tokamax builds from k_start + causality."""
  t = k_start_BxT.shape[1]
  q = jnp.arange(t)[None, :, None]
  k = jnp.arange(t)[None, None, :]
  return (k >= k_start_BxT[:, :, None]) & (k <= q)


def mask_from_offsets(offsets, seqlens, t: int, window=None):
  """The dense [B, T, T] mask cuDNN's packed causal layout means."""
  q = jnp.arange(t)[None, None, :, None]
  k = jnp.arange(t)[None, None, None, :]
  lo = offsets[:, :-1, None, None]
  hi = lo + seqlens[:, :, None, None]
  inside = (lo >= 0) & (seqlens[:, :, None, None] > 0)
  mask = inside & (q >= lo) & (q < hi) & (k >= lo) & (k <= q)
  if isinstance(window, int) and window > 0:
    mask &= q - k < window
  return jnp.any(mask, axis=1)


@functools.cache
def tokamax_available() -> bool:
  try:
    import tokamax  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _is_hopper_or_newer() -> bool:
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  return cc is not None and float(cc) >= 9.0


def best_gpu_backend(*, window=None, softcap=None) -> str | None:
  """The fused kernel `auto` uses for a layer on this GPU, or None."""
  if window is not None and not isinstance(window, int):
    return None  # a traced window: kernels need it static
  if tokamax_available():
    return "tokamax"
  if not softcap and _is_hopper_or_newer():
    return "cudnn"
  return None


def tokamax_attention(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                      kv_pos_BxS, kv_seg_BxS, *, window, softcap, scale, mode):
  """Train-mode attention by tokamax's Mosaic GPU flash kernel."""
  del q_pos_BxT, kv_pos_BxS, kv_seg_BxS
  if mode != "train":
    raise ValueError("tokamax attention implements train mode only")
  # Private module, as tokamax exposes Mask only there (MaxText does too).
  from tokamax._src.ops.attention import base as tk_base  # pylint: disable=g-import-not-at-top
  from tokamax._src.ops.attention import pallas_mosaic_gpu as tk_gpu  # pylint: disable=g-import-not-at-top
  k_start = segment_starts(q_seg_BxT, window)
  mask = tk_base.Mask(k_start=k_start[:, None, :], is_causal=True)
  return tk_gpu.PallasMosaicGpuFlashAttention()(
      q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, logits_scale=scale,
      logits_soft_cap=softcap or None, mask=mask)


def cudnn_attention(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
                    kv_pos_BxS, kv_seg_BxS, *, window, softcap, scale, mode):
  """Train-mode attention by cuDNN's packed (THD-like) flash kernel."""
  del q_pos_BxT, kv_pos_BxS, kv_seg_BxS
  if mode != "train":
    raise ValueError("cudnn attention implements train mode only")
  if softcap:
    raise ValueError("cudnn attention has no logit soft-cap; use tokamax, "
                     "xla_chunked or auto")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  offsets, seqlens, count_B = offsets_and_seqlens(q_seg_BxT)
  out = cudnn.dot_product_attention(
      q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, None, None, seqlens, seqlens,
      offsets, offsets, scale=scale, mask_type=cudnn.MaskType.CAUSAL,
      qkv_layout="BTNH",
      sliding_window_length=window if window and window > 0 else None)
  overflow = (count_B > MAX_SEGMENTS)[:, None, None, None]
  return jnp.where(overflow, jnp.nan, out).astype(q_BxTxHxK.dtype)


IMPLEMENTATIONS = {"tokamax": tokamax_attention, "cudnn": cudnn_attention}
