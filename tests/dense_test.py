"""dense.matmul: einsum's values and gradients, with a GEMM-shaped backward."""

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models import dense


def _inputs(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 12)), dtype)
  w = jnp.asarray(rng.normal(size=(12, 40)), dtype)
  g = jnp.asarray(rng.normal(size=(2, 7, 40)), jnp.float32)
  return x, w, g


def _value_and_grads(fn, x, w, g):
  out, vjp = jax.vjp(fn, x, w)
  return (out,) + vjp(g.astype(out.dtype))


def test_matches_einsum_value_and_grads():
  x, w, g = _inputs(jnp.float32)
  ref = _value_and_grads(lambda x, w: jnp.einsum("bti,io->bto", x, w), x, w, g)
  got = _value_and_grads(dense.matmul, x, w, g)
  for a, b in zip(ref, got):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_with_float32_output():
  """The unembedding's case: bf16 in, f32 logits, grads back in bf16."""
  x, w, g = _inputs(jnp.bfloat16)
  ref = _value_and_grads(lambda x, w: jnp.einsum(
      "bti,io->bto", x, w, preferred_element_type=jnp.float32), x, w, g)
  got = _value_and_grads(lambda x, w: dense.matmul(x, w, jnp.float32),
                         x, w, g)
  assert [a.dtype for a in got] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]
  for a, b in zip(ref, got):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2,
                               atol=2e-2)


def test_weight_gradient_copies_no_cotangent_sized_transpose():
  # 64 tokens, 16 -> 1000 (an unembedding): JAX's own rule has XLA:CPU copy
  # the [64, 1000] cotangent into a transposed [1000, 64] layout.
  x = jnp.zeros((4, 16, 16))
  w = jnp.zeros((16, 1000))
  def grad_hlo(fn):
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), (0, 1)))
    return f.lower(x, w).compile().as_text()
  assert "f32[1000,64]" in grad_hlo(
      lambda x, w: jnp.einsum("bti,io->bto", x, w))
  assert "f32[1000,64]" not in grad_hlo(dense.matmul)
