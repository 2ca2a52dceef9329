"""Test-wide settings: 8 simulated CPU devices, fast compiles, strict ranks.

XLA_FLAGS must be set before jax is imported anywhere, which is why it is done
here, at conftest import time.
"""

import os

# Tiny test programs spend far more time compiling than running: XLA's backend
# optimisation level 0 roughly halves CPU compile time, and the numbers stay
# within every tolerance the tests assert. Child processes (training runs
# started by the tests) inherit both flags through the environment.
_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f for f in _FLAGS if f.split("=")[0] not in os.environ.get(
        "XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
