"""Freezing the bottom layers so that they cost no gradient or optimizer state.

Layers are stacked on a leading axis [L, ...] under params "layers/...", so
"train the top N layers" (method.train_top_layers) is a slice of each stacked
leaf. During training every stacked leaf is cut in two:

  params["frozen_layers"][...] = x[:L-N]   frozen, run by a scan of its own
  params["layers"][...]        = x[L-N:]   trainable where method.trainable
                                           matches, frozen elsewhere

(`ModelConfig.frozen_layers = L - N` makes the model run the two scans). The
trainable state, its gradients and its optimizer state cover only the top N
layers, and no weight gradient is computed below them (nor any backward pass
at all when nothing under them trains, e.g. the embedding). `join_layers`
gives back the one [L, ...] tree that checkpoints, exports and inference use.
"""

import jax
import jax.numpy as jnp

from sft_jax.train import partition

LAYERS, FROZEN_LAYERS = "layers", "frozen_layers"


def _take(x, lo, hi):
  """x[lo:hi] along the layer axis, keeping x's sharding (or its shape)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((hi - lo,) + x.shape[1:], x.dtype,
                                sharding=x.sharding)
  return jax.jit(lambda a: a[lo:hi], out_shardings=x.sharding)(x)


def num_frozen_layers(top: int, params: dict) -> int:
  """L - top for the stacked params (0 when top <= 0 or top == L)."""
  if top <= 0 or LAYERS not in params:
    return 0
  num_layers = jax.tree.leaves(params[LAYERS])[0].shape[0]
  if top > num_layers:
    raise ValueError(f"config method.train_top_layers={top} > {num_layers} "
                     "layers")
  return num_layers - top


def split_layers(hit: dict, rest: dict, frozen_layers: int
                 ) -> tuple[dict, dict]:
  """(trainable, frozen) params from a regex split (hit, rest) of params.

  Stacked leaves of both parts lose their bottom `frozen_layers` layers to
  frozen["frozen_layers"]; see the module docstring.
  """
  if not frozen_layers:
    return hit, rest
  f = frozen_layers
  bottom, top_hit, top_rest = {}, {}, {}
  for part, top in ((hit, top_hit), (rest, top_rest)):
    for path, x in partition.flat(part).items():
      if path.startswith(LAYERS + "/"):
        n = x.shape[0]
        bottom[FROZEN_LAYERS + path[len(LAYERS):]] = _take(x, 0, f)
        top[path] = _take(x, f, n)
      else:
        top[path] = x
  return (partition.unflat(top_hit),
          partition.merge(partition.unflat(top_rest),
                          partition.unflat(bottom)))


def join_layers(variables: dict) -> dict:
  """The variables with params "frozen_layers" put back under "layers".

  A joined leaf takes the storage dtype of its frozen bottom
  (model.param_dtype), like every weight of an export.
  """
  params = variables.get("params", {})
  if FROZEN_LAYERS not in params:
    return variables
  bottom = partition.flat(params[FROZEN_LAYERS])
  top = partition.flat(params[LAYERS])
  joined = {p: jnp.concatenate([b, top[p].astype(b.dtype)])
            for p, b in bottom.items()}
  params = {k: v for k, v in params.items() if k != FROZEN_LAYERS}
  params[LAYERS] = partition.unflat(joined)
  return {**variables, "params": params}
