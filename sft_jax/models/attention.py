"""Attention over packed batches: one mask rule, several backends.

A query attends to a key iff they share a segment, the key is not padding
(segment 0), the key is not after the query and (for a sliding-window layer)
the key is fewer than `window` steps back:

  (seg_q == seg_k) & (seg_k != 0) & (ord_k <= ord_q) [& (ord_q - ord_k < window)]

"Not after" is measured in one of two modes:

  * "train": by index in the row (keys are the queries' own tokens, T == S).
    Within a packed segment positions count up by one, so this equals the
    position rule; it is the rule every fused kernel (splash, cuDNN, Mosaic
    GPU) implements, and it lets `xla_chunked` skip whole blocks.
  * "cache": by position (a KV cache whose slots carry their own positions
    and segment ids). Only the XLA paths serve this mode.

Backends (`impl`), all equal to "xla" in forward and gradient (see
tests/attention_test.py):
  xla          reference: float32 logits [B, N, G, T, S]; runs everywhere.
  xla_chunked  query blocks of `_CHUNK`, each over only the key blocks that
               causality and the window leave visible, rematerialised in the
               backward pass; any T (padded internally).
  splash       TPU Pallas splash attention (attention_splash.py).
  cudnn        GPU cuDNN flash attention, packed layout (attention_gpu.py).
  tokamax      GPU Mosaic flash attention from tokamax (attention_gpu.py).
  auto         splash on TPU, a fused GPU kernel where it supports the layer,
               else xla_chunked; `resolve` says which.
"""

import importlib

import jax
import jax.numpy as jnp

# Finite, so that a query with no visible key (padding) softmaxes to a
# uniform row instead of NaN; such rows are never supervised.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

MODES = ("train", "cache")
# impl -> module that defines it (imported on first use: the kernels pull in
# Pallas or tokamax, which plain CPU runs never need).
_BACKEND_MODULES = {"xla": None, "xla_chunked": "attention_chunked",
                    "splash": "attention_splash", "cudnn": "attention_gpu",
                    "tokamax": "attention_gpu"}
IMPLEMENTATIONS = tuple(_BACKEND_MODULES) + ("auto",)


def attention_mask(q_ord_BxT, q_seg_BxT, kv_ord_BxS, kv_seg_BxS, window=None):
  """Boolean mask [B, T, S]; `window` (int or traced scalar) <= 0 = none.

  `*_ord` are positions (cache mode) or indices in the row (train mode).
  """
  q_ord = q_ord_BxT[:, :, None]
  k_ord = kv_ord_BxS[:, None, :]
  mask = ((q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :])
          & (kv_seg_BxS[:, None, :] != 0) & (k_ord <= q_ord))
  if window is not None and not (isinstance(window, int) and window <= 0):
    mask &= (window <= 0) | (q_ord - k_ord < window)
  return mask


def order(q_pos_BxT, kv_pos_BxS, mode: str, q_offset: int = 0):
  """The (q_ord, kv_ord) the mask compares: indices (train) or positions."""
  if mode == "cache":
    return q_pos_BxT, kv_pos_BxS
  b, t = q_pos_BxT.shape
  s = kv_pos_BxS.shape[1]
  q_ord = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + q_offset, (b, t))
  return q_ord, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def reference(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_ord_BxT, q_seg_BxT,
              kv_ord_BxS, kv_seg_BxS, window, softcap, scale):
  """Dense attention under `attention_mask`; float32 logits [B,N,G,T,S]."""
  b, t, h, d = q_BxTxHxK.shape
  n = k_BxSxNxK.shape[2]
  q_BxTxNxGxK = q_BxTxHxK.reshape(b, t, n, h // n, d)
  logits_BxNxGxTxS = jnp.einsum(
      "btngk,bsnk->bngts", q_BxTxNxGxK, k_BxSxNxK,
      preferred_element_type=jnp.float32) * scale
  if softcap:
    logits_BxNxGxTxS = jnp.tanh(logits_BxNxGxTxS / softcap) * softcap
  mask_BxTxS = attention_mask(q_ord_BxT, q_seg_BxT, kv_ord_BxS, kv_seg_BxS,
                              window)
  logits_BxNxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxNxGxTxS,
                               MASKED)
  probs = jax.nn.softmax(logits_BxNxGxTxS, axis=-1).astype(v_BxSxNxK.dtype)
  out_BxTxNxGxK = jnp.einsum("bngts,bsnk->btngk", probs, v_BxSxNxK)
  return out_BxTxNxGxK.reshape(b, t, h, d)


def _xla(q, k, v, q_pos, q_seg, kv_pos, kv_seg, *, window, softcap, scale,
         mode):
  q_ord, kv_ord = order(q_pos, kv_pos, mode)
  return reference(q, k, v, q_ord, q_seg, kv_ord, kv_seg, window, softcap,
                   scale)


def backend(impl: str):
  """The function behind a concrete impl name (not "auto")."""
  if impl not in _BACKEND_MODULES:
    raise ValueError(f"unknown attention impl {impl!r}; available: "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if impl == "xla":
    return _xla
  module = importlib.import_module(f"sft_jax.models.{_BACKEND_MODULES[impl]}")
  return module.IMPLEMENTATIONS[impl]


def resolve(impl: str, *, mode: str = "train", window=None, softcap=None,
            platform: str | None = None) -> str:
  """The concrete backend `impl` runs as for one kind of layer.

  Kernels implement index causality only, so cache mode (decoding) always
  runs an XLA path: "xla" (the new tokens are few) unless "xla_chunked" was
  asked for. `auto` picks by platform and by what the kernel supports.
  """
  if impl not in IMPLEMENTATIONS:
    backend(impl)  # raises the unknown-impl error
  if mode == "cache":
    return "xla_chunked" if impl == "xla_chunked" else "xla"
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda"):
    from sft_jax.models import attention_gpu  # pylint: disable=g-import-not-at-top
    fused = attention_gpu.best_gpu_backend(window=window, softcap=softcap)
    if fused:
      return fused
  return "xla_chunked"


def summary(impl: str, windows, softcap=None, remat: str = "none",
            platform: str | None = None) -> str:
  """One line naming the backend each attention pattern trains with."""
  parts = []
  for w in windows:
    kind = f"window {w}" if w else "full"
    chosen = resolve(impl, window=w or None, softcap=softcap,
                     platform=platform)
    parts.append(f"{kind}: {chosen}")
  return (f"attention {impl} on {platform or jax.default_backend()} -> "
          f"{', '.join(parts)}; remat {remat}")


def attention(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT, q_seg_BxT,
              kv_pos_BxS, kv_seg_BxS, *, window=None, softcap=None,
              scale: float, impl: str = "xla", mode: str = "cache"):
  """Grouped-query attention, softmax in float32.

  Args:
    q_BxTxHxK: queries (rotary already applied).
    k_BxSxNxK, v_BxSxNxK: keys and values, H a multiple of N.
    q_pos_BxT, q_seg_BxT: query positions and segment ids (int32).
    kv_pos_BxS, kv_seg_BxS: key positions and segment ids (0 = empty slot).
    window: sliding window; a Python int lets backends skip blocks, a traced
      int32 scalar only works with the XLA paths. None or <= 0 = full.
    softcap: if set, logits become softcap * tanh(logits / softcap).
    scale: multiplies q.k before the cap.
    impl: one of IMPLEMENTATIONS (see the module docstring).
    mode: "train" (causality by index; keys are the queries' tokens) or
      "cache" (causality by position).

  Returns:
    [B, T, H, K] in q's dtype.
  """
  if mode not in MODES:
    raise ValueError(f"unknown attention mode {mode!r}; use one of {MODES}")
  h, n = q_BxTxHxK.shape[2], k_BxSxNxK.shape[2]
  if h % n:
    raise ValueError(f"{h} query heads do not group over {n} kv heads")
  if mode == "train" and q_BxTxHxK.shape[1] != k_BxSxNxK.shape[1]:
    raise ValueError("train mode needs keys of the queries' own tokens "
                     f"(T={q_BxTxHxK.shape[1]}, S={k_BxSxNxK.shape[1]})")
  concrete = resolve(impl, mode=mode, window=window, softcap=softcap)
  return backend(concrete)(q_BxTxHxK, k_BxSxNxK, v_BxSxNxK, q_pos_BxT,
                           q_seg_BxT, kv_pos_BxS, kv_seg_BxS, window=window,
                           softcap=softcap, scale=scale, mode=mode)
