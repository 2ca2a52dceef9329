"""Fused GPU attention against the reference; skipped without an NVIDIA GPU.

Run by scripts/gpu_check.sh on a GPU machine (JAX_PLATFORMS=cuda).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models import attention as attention_lib
from sft_jax.models import attention_gpu

import attention_test  # pylint: disable=g-bad-import-order

_ON_GPU = jax.default_backend() == "gpu"
pytestmark = pytest.mark.skipif(not _ON_GPU, reason="needs an NVIDIA GPU")


def _hopper() -> bool:
  return _ON_GPU and attention_gpu._is_hopper_or_newer()  # pylint: disable=protected-access


@pytest.mark.parametrize("kind", sorted(attention_test.KINDS))
def test_tokamax_meets_the_contract(kind):
  if not attention_gpu.tokamax_available():
    pytest.skip("tokamax not installed (optional gpu extra)")
  if not _hopper():
    pytest.skip("Mosaic GPU backward needs sm90+")
  assert attention_test.contract_error(attention_lib.backend("tokamax"),
                                       kind) < 2e-3


@pytest.mark.parametrize("kind", ["causal", "sliding"])
def test_cudnn_meets_the_contract(kind):
  if not _hopper():
    pytest.skip("cuDNN packed layout needs sm90+")
  assert attention_test.contract_error(attention_lib.backend("cudnn"),
                                       kind) < 2e-3


def test_auto_picks_a_fused_kernel_that_supports_soft_caps():
  picked = attention_lib.resolve("auto", softcap=50.0)
  if attention_gpu.tokamax_available():
    assert picked == "tokamax"
  else:
    assert picked == "xla_chunked"  # cuDNN has no soft-cap


def test_bf16_chunked_matches_float32_reference_on_gpu():
  q, k, v, pos, seg = attention_test.packed_batch()
  out32 = attention_lib.attention(q, k, v, pos, seg, pos, seg, scale=0.25,
                                  impl="xla", mode="train")
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out16 = attention_lib.attention(*bf, pos, seg, pos, seg, scale=0.25,
                                  impl="xla_chunked", mode="train")
  valid = np.asarray(seg != 0)[:, :, None, None]
  err = np.abs(np.where(valid, np.asarray(out16, np.float32) - out32, 0))
  assert err.max() < 5e-2
