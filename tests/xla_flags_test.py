"""GPU XLA flags: added by default, never over the user's."""

from sft_jax import xla_flags


def test_gpu_xla_flags_keep_what_the_user_set():
  got = xla_flags.with_gpu_flags(
      "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x").split()
  assert got[:2] == ["--xla_gpu_enable_triton_gemm=true",
                     "--xla_dump_to=/tmp/x"]
  assert sorted(got[2:]) == sorted(
      f for f in xla_flags.GPU_FLAGS if "triton_gemm" not in f)
