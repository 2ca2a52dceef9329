"""Logical axis names for every variable and activation, for sharding rules.

Parameter names: "embed" (D), "vocab" (V), "heads" (H*K, split by heads),
"kv_heads" (N*K), "head_dim" (K), "mlp" (F), "layers" (L), "lora_rank" (R).

Activation names are separate, so a weight's D can be sharded over "fsdp"
while the residual stream's D is not: "batch" (B), "length" (T), "act_embed"
(D), "act_heads" (H), "act_kv_heads" (N), "act_mlp" (F), "act_vocab" (V).
`constrain(x, axes)` pins an activation's layout where the model decides it;
it does nothing unless `activation_sharding(mesh, rules)` is active while the
function is traced, so single-device code is unchanged. Likewise
`constrain_weight` / `dense` give a weight its layout at its matmul: gathered
over the batch axes (FSDP), still split over "tensor".
"""

import contextlib
import contextvars
import re

import jax
from jax.sharding import NamedSharding

from sft_jax.models import dense as dense_lib
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


def constrain_weight(w: jax.Array, axes: tuple[str | None, ...]
                     ) -> jax.Array:
  """A weight as a matmul uses it: its layout minus the batch mesh axes.

  `axes` are the weight's parameter axes (as in `_PARAM_AXES`, without
  "layers" inside the layer scan); the layout is theirs under the rules with
  the mesh axes of rules["batch"] removed. FSDP keeps a weight split over
  "fsdp" at rest and all-gathers it where it is used; this pins that gather
  (tensor-parallel splits stay). Besides saying what FSDP means, it keeps the
  step correct: without it XLA's SPMD partitioner (jax 0.10, CPU)
  mis-partitions y = h @ w for h [B, T, F] rows over ("data", "fsdp") and F
  over "tensor", w [F, D] over ("tensor", "fsdp"), y's D over "tensor", at
  one row per device: rows 1 and 2 of 4 come back swapped. With
  act_embed="tensor" that pattern is the down and output projections and the
  LM head's backward (a wrong loss and gradients on a (2, 2, 2) mesh with
  grad_accum=2; tests/sharding_test.py). For the embedding table it also
  keeps the lookup local: left split over "fsdp", its backward pass made XLA
  replicate the whole batch's activation gradient on every device ("involuntary
  full rematerialization" on data=2 x fsdp=4). A no-op unless
  `activation_sharding` is active.
  """
  active = _ACTIVE.get()
  if active is None:
    return w
  from sft_jax.train import sharding as train_sharding  # pylint: disable=g-import-not-at-top
  mesh, rules = active
  batch_axes = set(rules.get("batch", ()))
  use_rules = {name: tuple(a for a in mesh_axes if a not in batch_axes)
               for name, mesh_axes in rules.items()}
  spec = train_sharding.logical_to_spec(axes, w.shape, mesh, use_rules)
  if spec == train_sharding.logical_to_spec(axes, w.shape, mesh, rules):
    return w  # Not split over a batch axis: nothing to gather.
  return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec))


def constrain_kernel(kernel: jax.Array, module_path: tuple[str, ...]
                     ) -> jax.Array:
  """`constrain_weight` for a layer's kernel, axes found by its module path.

  A kernel whose path has no logical axes is left to XLA.
  """
  if _ACTIVE.get() is None:
    return kernel
  # Inside the layer scan a kernel has no "layers" axis; frozen bottom layers
  # run the same blocks under "frozen_layers"; the grouped scan's own scopes
  # are not part of the parameter path.
  from sft_jax.models import layer_scan  # pylint: disable=g-import-not-at-top
  path = re.sub(r"^frozen_layers/", "layers/",
                layer_scan.logical_path(module_path))
  try:
    axes = _param_axes(path + "/kernel")
  except KeyError:
    return kernel
  if axes[0] == "layers" and len(axes) == kernel.ndim + 1:
    axes = axes[1:]
  if len(axes) != kernel.ndim:
    return kernel
  return constrain_weight(kernel, axes)


def gathered_matmul(x_BxTxI: jax.Array, kernel_IxO: jax.Array,
                    module_path: tuple[str, ...]) -> jax.Array:
  """`dense.matmul(x, kernel)`, the kernel gathered as `constrain_kernel` says.

  Under a mesh the gather is redone in the backward pass instead of being
  saved: saved, the layer scan would keep every layer's gathered kernel (the
  whole model on each device, which FSDP exists to avoid).
  """
  matmul = dense_lib.matmul
  if _ACTIVE.get() is None:
    return matmul(x_BxTxI, kernel_IxO)
  return jax.checkpoint(
      lambda x, w: matmul(x, constrain_kernel(w, module_path)))(x_BxTxI,
                                                                kernel_IxO)
