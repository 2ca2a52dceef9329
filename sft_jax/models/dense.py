"""`x @ w` over the last axis, with its weight gradient written in w's layout.

JAX differentiates `einsum("bti,io->bto", x, w)` with respect to w as
dot(g, x) -> [O, I] followed by a transpose to [I, O]. XLA:CPU folds that
transpose into the dot by copying the cotangent g (tokens x O, the largest
tensor involved: the logits' gradient for the unembedding) into a transposed
layout and running a both-operands-transposed dot outside its fast GEMM
path. For the 8 x 512-token, 8000-word unembedding this took 2.2x the time of
the plain x^T g below, which XLA runs as one GEMM after transposing the small
x. It is written over [tokens, features] views: as a 3-D contraction over
(b, t) XLA:CPU ran a slower GEMM and fused the transpose into x's producer as
a strided loop. The numbers are the same (it is the same contraction); other
backends lower every form equally well.
"""

import functools

import jax
import jax.numpy as jnp


def _dot(x_BxTxI, w_IxO, out_dtype):
  return jnp.einsum("bti,io->bto", x_BxTxI, w_IxO,
                    preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_BxTxI: jax.Array, w_IxO: jax.Array, out_dtype=None) -> jax.Array:
  """einsum("bti,io->bto"); `out_dtype` as einsum's preferred_element_type.

  The gradients are computed in the wider of the operand and cotangent
  dtypes, then cast to the operand's dtype (as JAX's own rule does).
  """
  return _dot(x_BxTxI, w_IxO, out_dtype)


def _matmul_fwd(x_BxTxI, w_IxO, out_dtype):
  return _dot(x_BxTxI, w_IxO, out_dtype), (x_BxTxI, w_IxO)


def _matmul_bwd(out_dtype, residuals, g_BxTxO):
  del out_dtype
  x_BxTxI, w_IxO = residuals
  dx_BxTxI = jnp.einsum("bto,io->bti", g_BxTxO, w_IxO)
  dw_IxO = jax.lax.dot_general(
      x_BxTxI.reshape(-1, x_BxTxI.shape[-1]),
      g_BxTxO.reshape(-1, g_BxTxO.shape[-1]), (((0,), (0,)), ((), ())))
  return dx_BxTxI.astype(x_BxTxI.dtype), dw_IxO.astype(w_IxO.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
