"""Checkpoint faults: a save killed midway, a truncated file.

A SIGKILL while the async save writes leaves no step directory behind (only
Orbax's temporary one, cleared on the next start): the run resumes from the
last complete checkpoint. A truncated file in the newest checkpoint makes
the restore fall back to the previous one, with a warning naming it.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.train import checkpoint as checkpoint_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Saves steps 1 and 2 and waits; then starts step 3 (a few hundred MB, so
# the background write is still going) and kills itself at once.
_CHILD = """
import os, signal, sys
import jax.numpy as jnp
from sft_jax.train import checkpoint as checkpoint_lib
ckpt = checkpoint_lib.Checkpointer(sys.argv[1], keep=5)
def save(step, n):
  ckpt.save(step, {"w": jnp.full((n,), float(step))}, data_state={"pos": step},
            config={}, tokenizer_files={})
save(1, 1000); save(2, 1000); ckpt.wait()
save(3, 100_000_000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _target(n):
  return {"w": jax.ShapeDtypeStruct((n,), jnp.float32,
                                    sharding=jax.sharding.SingleDeviceSharding(
                                        jax.devices()[0]))}


def test_kill_during_async_save_resumes_from_last_complete(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)],
                        env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  assert ckpt.all_steps() == [1, 2]
  step, state, data_state, warnings = ckpt.restore_newest_readable(
      _target(1000))
  assert (step, data_state, warnings) == (2, {"pos": 2}, [])
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full(1000, 2.0))
  ckpt.close()


def test_truncated_latest_checkpoint_falls_back_with_a_warning(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.full((4096,), float(step))},
              data_state={"pos": step}, config={}, tokenizer_files={})
  ckpt.wait()
  files = [p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)
  step, state, data_state, warnings = ckpt.restore_newest_readable(
      _target(4096))
  assert (step, data_state) == (1, {"pos": 1})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4096, 1.0))
  assert len(warnings) == 1 and str(tmp_path / "2") in warnings[0], warnings
  assert ckpt.all_steps() == [1] and (tmp_path / "2.unreadable").is_dir()
  ckpt.close()


def test_a_target_no_checkpoint_fits_renames_nothing(tmp_path):
  # A config that does not fit the run fails on every step: that is not a
  # damaged checkpoint, so none may be moved aside.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5, async_save=False)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.full((64,), float(step))},
              data_state={"pos": step}, config={}, tokenizer_files={})
  ckpt.wait()
  with pytest.raises(Exception):
    ckpt.restore_newest_readable(_target(32))
  assert ckpt.all_steps() == [1, 2]
  assert not list(tmp_path.glob("*.unreadable"))
  ckpt.close()
