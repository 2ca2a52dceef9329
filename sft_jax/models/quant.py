"""Block-wise weight quantization of a frozen base (QLoRA): NF4 and int8.

A quantized kernel [..., I, O] is the pytree {"codes", "scale"} in place of
the array, at the same path ("layers/attn/q_proj/kernel/codes", ".../scale"):

  nf4   codes uint8 [..., I/2, O]: two 4-bit indices into NF4 per byte
        (row 2i in the low nibble, row 2i+1 in the high one);
  int8  codes int8 [..., I, O]: round(127 * w / absmax);
  both  scale float32 [..., I/B, O]: the absmax of each block of B rows of
        one output column, so a block never crosses devices when the input
        axis is sharded (B divides each device's rows);
  or, with double quantization (QLoRA's second level), the scales
  themselves quantized: scale_codes uint8 [..., I/B, O] = round(255 * scale
  / m) with m, scale_absmax float32 [..., I/B, O/C], the max over blocks of
  C = min(256, O) columns.

That is 0.5 + 4/B bytes per weight for nf4 (0.5625 at B = 64, 0.28x bf16;
0.516 double-quantized, 0.258x) and 1 + 4/B for int8. The format and B are read back from the shapes and
dtypes, so `dequantize` needs nothing else. Layers dequantize their kernel
to the compute dtype where it is used (`_Dense`), one layer at a time inside
the layer scan; the quantized base is never differentiated.

Own code rather than qwix: qwix's LoRA provider intercepts `dot_general`, and
fails on modules that call `jnp.einsum` on a parameter (ours all do); its
LoRA weights also take the dtype of the quantization scale.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("nf4", "int8")

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, and
# bitsandbytes' `create_normal_map(offset=0.9677083)`): normal quantiles,
# 8 positive and 7 negative, with an exact zero, scaled to [-1, 1].
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# The quantized kernels: every _Dense of the layer stack (embedding and
# unembedding stay in model.param_dtype, as in QLoRA).
QUANTIZED = r"^layers/.*/kernel$"


_SINGLE, _DOUBLE = {"codes", "scale"}, {"codes", "scale_codes", "scale_absmax"}


def is_quantized(x) -> bool:
  return isinstance(x, dict) and set(x) in (_SINGLE, _DOUBLE)


def _check(shape, fmt: str, block: int):
  if fmt not in FORMATS:
    raise ValueError(f"quantization format {fmt!r} ({' | '.join(FORMATS)})")
  rows = shape[-2]
  if block <= 0 or rows % block or (fmt == "nf4" and block % 2):
    raise ValueError(f"quantization block {block} does not divide the "
                     f"{rows} input rows of a {tuple(shape)} kernel (an even "
                     "divisor is needed)")


def _double(q: dict) -> dict:
  """Second level: the positive float32 scales as uint8 per column block."""
  scale = q.pop("scale")
  *lead, rows, cols = scale.shape
  c = min(256, cols)
  if cols % c:
    raise ValueError(f"double quantization: {cols} output columns do not "
                     f"split into blocks of {c}")
  s = scale.reshape(*lead, rows, cols // c, c)
  absmax = jnp.max(s, axis=-1)
  q["scale_codes"] = jnp.round(s / absmax[..., None] * 255).astype(
      jnp.uint8).reshape(scale.shape)
  q["scale_absmax"] = absmax
  return q


def _scale(q: dict) -> jax.Array:
  if "scale" in q:
    return q["scale"]
  codes, absmax = q["scale_codes"], q["scale_absmax"]
  *lead, rows, cols = codes.shape
  c = cols // absmax.shape[-1]
  s = codes.astype(jnp.float32).reshape(*lead, rows, cols // c, c) / 255
  return (s * absmax[..., None]).reshape(codes.shape)


def quantize(w, fmt: str, block: int, double: bool = False) -> dict:
  """{"codes", "scale"} of a kernel w [..., I, O] (any float dtype); with
  `double`, {"codes", "scale_codes", "scale_absmax"}."""
  if double:
    return _double(quantize(w, fmt, block))
  _check(w.shape, fmt, block)
  *lead, rows, cols = w.shape
  w_blocks = w.astype(jnp.float32).reshape(*lead, rows // block, block, cols)
  absmax = jnp.max(jnp.abs(w_blocks), axis=-2)
  scale = jnp.where(absmax > 0, absmax, 1.0)
  x = w_blocks / scale[..., None, :]
  if fmt == "int8":
    codes = jnp.round(x * 127).astype(jnp.int8).reshape(w.shape)
    return {"codes": codes, "scale": scale}
  # Nearest level: the index of the first midpoint above x.
  mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
  idx = jnp.searchsorted(mids, x.reshape(w.shape)).astype(jnp.uint8)
  pairs = idx.reshape(*lead, rows // 2, 2, cols)
  codes = pairs[..., 0, :] | (pairs[..., 1, :] << 4)
  return {"codes": codes, "scale": scale}


def dequantize(q: dict, dtype=jnp.float32) -> jax.Array:
  """The kernel [..., I, O] in `dtype` from `quantize`'s output."""
  codes, scale = q["codes"], _scale(q)
  *lead, n, cols = codes.shape
  if codes.dtype == jnp.int8:
    values = codes.astype(jnp.float32) / 127
  else:
    idx = jnp.stack([codes & 15, codes >> 4], axis=-2)
    n *= 2
    values = jnp.asarray(NF4)[idx.reshape(*lead, n, cols).astype(jnp.int32)]
  blocks = scale.shape[-2]
  values = values.reshape(*lead, blocks, n // blocks, cols)
  return (values * scale[..., None, :]).reshape(*lead, n, cols).astype(dtype)


def quantized_init(init, fmt: str, block: int, double: bool = False):
  """A param initialiser: `init`'s random kernel, quantized."""
  def fn(rng, shape, dtype=jnp.float32):
    return quantize(init(rng, shape, dtype), fmt, block, double)
  return fn


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
  """A copy of `params` with every quantized kernel dequantized."""
  if is_quantized(params):
    return dequantize(params, dtype)
  if isinstance(params, dict):
    return {k: dequantize_params(v, dtype) for k, v in params.items()}
  return params


def quantizes(path: str) -> bool:
  """Whether the param at `path` ("layers/attn/q_proj/kernel") is quantized."""
  return re.search(QUANTIZED, path) is not None


def nbytes_per_device(tree) -> int:
  """Bytes of `tree`'s arrays held by the first device (one shard each)."""
  device = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
