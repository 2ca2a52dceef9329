"""Rotary position embedding (rotate-half layout) with whole-stack tables.

cos and sin are computed once per forward pass, one table per distinct
inverse-frequency row (Gemma-3's local and global layers differ), in float32,
and every layer reads its row. Computed inside each layer, XLA recomputes
the sine and cosine for every head of q and k (a transcendental per element),
in the forward pass and again in the backward.
"""

import jax
import jax.numpy as jnp
import numpy as np


def stack_tables(layer_inv_freq_LxK2: np.ndarray, positions_BxT: jax.Array,
                 dtype) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """((cos, sin) [U, B, T, 1, K/2] each, each layer's row [L] int32)."""
  inv_freq_UxK2, rows = np.unique(layer_inv_freq_LxK2, axis=0,
                                  return_inverse=True)
  angles_UxBxTxK2 = (positions_BxT[None, :, :, None].astype(jnp.float32)
                     * jnp.asarray(inv_freq_UxK2)[:, None, None, :])
  tables = tuple(f(angles_UxBxTxK2)[:, :, :, None, :].astype(dtype)
                 for f in (jnp.cos, jnp.sin))
  return tables, jnp.asarray(rows.reshape(-1), jnp.int32)


def layer_tables(tables, row):
  """One layer's (cos, sin) [B, T, 1, K/2] from `stack_tables`' tables."""
  return tuple(t[0] if t.shape[0] == 1 else t[row] for t in tables)


def apply(x_BxTxHxK, cos_BxTx1xK2, sin_BxTx1xK2):
  """Rotary embedding of x's last axis, in x's dtype."""
  x1, x2 = jnp.split(x_BxTxHxK, 2, axis=-1)
  return jnp.concatenate([x1 * cos_BxTx1xK2 - x2 * sin_BxTx1xK2,
                          x2 * cos_BxTx1xK2 + x1 * sin_BxTx1xK2],
                         axis=-1).astype(x_BxTxHxK.dtype)
