"""Logical axis names for every variable, for the trainer's sharding rules.

Names: "embed" (D), "vocab" (V), "heads" (H*K, split by heads),
"kv_heads" (N*K), "head_dim" (K), "mlp" (F), "layers" (L), "lora_rank" (R).
"""

import re

import jax

from sft_jax.models import transformer
from sft_jax.models.config import ModelConfig

# (regex on the "/"-joined param path, axes), first match wins.
_PARAM_AXES = (
    (r"embedder/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"final_norm/scale", ("embed",)),
    (r"layers/attn/[qk]_norm/scale", ("layers", "head_dim")),
    (r"layers/\w+_norm/scale", ("layers", "embed")),
    (r"layers/attn/q_proj/kernel", ("layers", "embed", "heads")),
    (r"layers/attn/q_proj/bias", ("layers", "heads")),
    (r"layers/attn/[kv]_proj/kernel", ("layers", "embed", "kv_heads")),
    (r"layers/attn/[kv]_proj/bias", ("layers", "kv_heads")),
    (r"layers/attn/o_proj/kernel", ("layers", "heads", "embed")),
    (r"layers/attn/o_proj/bias", ("layers", "embed")),
    (r"layers/mlp/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/(gate|up)_proj/bias", ("layers", "mlp")),
    (r"layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"layers/mlp/down_proj/bias", ("layers", "embed")),
)


def _param_axes(path: str) -> tuple[str, ...]:
  # A quantized kernel's codes and block scales keep the kernel's axes.
  path = re.sub(r"/kernel/(codes|scale|scale_codes|scale_absmax)$", "/kernel",
                path)
  for regex, axes in _PARAM_AXES:
    if re.fullmatch(regex, path):
      return axes
  raise KeyError(f"no logical axes for param {path}")


def _path_str(key_path) -> str:
  return "/".join(str(k.key) for k in key_path)


def logical_axes(cfg: ModelConfig):
  """A pytree like `init(cfg, rng)` whose leaves are tuples of axis names.

  LoRA a [L, in, R] gets (layers, <kernel's in axis>, lora_rank) and b
  [L, R, out] gets (layers, lora_rank, <kernel's out axis>). Tuples are
  pytrees too: map over this with `is_leaf=lambda x: isinstance(x, tuple)`.
  """
  shapes = jax.eval_shape(
      lambda: transformer.init(cfg, jax.random.key(0)))

  def params_leaf(key_path, sds):
    axes = _param_axes(_path_str(key_path))
    assert len(axes) == len(sds.shape), (key_path, sds.shape)
    return axes

  def lora_leaf(key_path, sds):
    path = _path_str(key_path)
    module, which = path.rsplit("/", 1)
    layers, ax_in, ax_out = _param_axes(module + "/kernel")
    del sds
    return ((layers, ax_in, "lora_rank") if which == "a"
            else (layers, "lora_rank", ax_out))

  out = {"params": jax.tree_util.tree_map_with_path(params_leaf,
                                                    shapes["params"])}
  if "lora" in shapes:
    out["lora"] = jax.tree_util.tree_map_with_path(lora_leaf, shapes["lora"])
  return out
