"""Logical axis names for every variable and activation, for sharding rules.

Parameter names: "embed" (D), "vocab" (V), "heads" (H*K, split by heads),
"kv_heads" (N*K), "head_dim" (K), "mlp" (F), "layers" (L), "lora_rank" (R).

Activation names are separate, so a weight's D can be sharded over "fsdp"
while the residual stream's D is not: "batch" (B), "length" (T), "act_embed"
(D), "act_heads" (H), "act_kv_heads" (N), "act_mlp" (F), "act_vocab" (V).
`constrain(x, axes)` pins an activation's layout where the model decides it;
it does nothing unless `activation_sharding(mesh, rules)` is active while the
function is traced, so single-device code is unchanged.
"""

import contextlib
import contextvars
import re

import jax
from jax.sharding import NamedSharding

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
  # Imported here: transformer.py imports this module for `constrain`.
  from sft_jax.models import transformer  # pylint: disable=g-import-not-at-top
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


ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads",
                   "act_kv_heads", "act_mlp", "act_vocab")

# (mesh, rules) while tracing under `activation_sharding`, else None.
_ACTIVE = contextvars.ContextVar("sft_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None,
                        rules: dict[str, tuple[str, ...]] | None):
  """Within the block, `constrain` shards activations over `mesh` by `rules`.

  Must be active while the model is traced (inside the jitted function),
  not merely when it is called. mesh=None leaves `constrain` a no-op.
  """
  token = _ACTIVE.set(None if mesh is None else (mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """`x` with the sharding its logical `axes` map to (no-op when inactive).

  A mesh axis that does not divide a dimension is dropped for that dimension
  (see train.sharding.logical_to_spec), so odd shapes stay replicated.
  Axes without a rule (a run's config saved before the activation rules)
  leave `x` unconstrained.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  from sft_jax.train import sharding as train_sharding  # pylint: disable=g-import-not-at-top
  mesh, rules = active
  if any(a is not None and a not in rules for a in axes):
    return x  # A config saved before these rules existed: leave it to XLA.
  spec = train_sharding.logical_to_spec(axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
