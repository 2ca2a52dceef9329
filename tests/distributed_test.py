"""A host that never reaches a barrier: the others fail with a clear message
after distributed.barrier_timeout_s instead of waiting forever. Work that
process 0 does first and fails: the others stop with its error."""

import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Process 1 stands for a dead host: it joins the job, then never arrives.
_CHILD = """
import os, sys, time
from sft_jax.train import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
def bad_data():
  raise ValueError("train.jsonl line 7: no 'messages'")
try:
  distributed.main_process_first(bad_data, "tokenize", timeout_s=60)
except distributed.MainProcessFailedError as e:
  print(e, flush=True)
except ValueError:
  pass
if int(sys.argv[2]) == 1:
  time.sleep(30)
  os._exit(0)
try:
  distributed.barrier("checkpoint", timeout_s=2)
except distributed.BarrierTimeoutError as e:
  print(e, flush=True)
  os._exit(3)
os._exit(0)
"""


def test_barrier_times_out_with_a_clear_message():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _CHILD, f"127.0.0.1:{port}", str(i)], env=env,
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  start = time.monotonic()
  try:
    out, err = procs[0].communicate(timeout=60)
  finally:
    procs[1].kill()
    out1, _ = procs[1].communicate()
  assert procs[0].returncode == 3, err[-2000:]
  assert time.monotonic() - start < 30
  assert ("process 1: process 0 failed at 'tokenize', so this process stops "
          "too: ValueError: train.jsonl line 7: no 'messages'") in out1
  assert ("process 0 of 2: the other processes did not reach 'checkpoint' "
          "within 2 s (distributed.barrier_timeout_s)") in out
