"""XLA flags that matter for training speed on NVIDIA GPUs, set by default.

Applied before jax initialises, and only when an NVIDIA driver is present
and the platform is not forced elsewhere (JAX_PLATFORMS). A flag already in
XLA_FLAGS is left as the user set it; SFT_JAX_GPU_FLAGS=0 turns this off.

  --xla_gpu_enable_latency_hiding_scheduler=true  overlap collectives and
      compute (FSDP all-gathers behind matmuls)
  --xla_gpu_enable_triton_gemm=false  cuBLAS for bf16 matmuls: faster on
      Hopper for LLM shapes (JAX GPU performance tips)
  --xla_gpu_enable_command_buffer=  no CUDA graphs: they capture every
      shape of a step and cost compile time and memory for little gain in
      large steps
"""

import os

GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",
             "--xla_gpu_enable_triton_gemm=false",
             "--xla_gpu_enable_command_buffer=")


def _has_nvidia_gpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  return os.path.exists("/proc/driver/nvidia/version")


def with_gpu_flags(xla_flags: str) -> str:
  """`xla_flags` plus every GPU_FLAGS entry whose name it does not set."""
  have = {f.split("=", 1)[0] for f in xla_flags.split()}
  extra = [f for f in GPU_FLAGS if f.split("=", 1)[0] not in have]
  return " ".join([xla_flags] + extra if xla_flags else extra)


def set_default_gpu_flags() -> bool:
  """Adds GPU_FLAGS to XLA_FLAGS on an NVIDIA machine; True if it did."""
  if os.environ.get("SFT_JAX_GPU_FLAGS", "1") == "0" or not _has_nvidia_gpu():
    return False
  os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))
  return True
