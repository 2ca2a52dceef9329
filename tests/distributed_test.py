"""A failed host never leaves the others waiting forever: a host that never
reaches a barrier (distributed.barrier_timeout_s), work that process 0 does
first and fails (its error), a host killed mid-training (the peer watchdog,
distributed.heartbeat_timeout_s). Each is one line and exit code 4."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from multihost_test import _free_port  # pylint: disable=g-bad-import-order

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
  port = _free_port()
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


def test_a_killed_process_stops_the_others_in_one_line(tmp_path):
  """SIGKILL of process 1 during training steps: process 0 leaves within
  distributed.heartbeat_timeout_s (+ margin) with one line naming process 1
  and exit code 4, instead of hanging in the step's collectives."""
  import tiny_tok  # pylint: disable=g-import-not-at-top
  from train_loop_test import _records, _write_jsonl  # pylint: disable=g-import-not-at-top
  tiny_tok.make_tokenizer(tmp_path / "tok")
  _write_jsonl(tmp_path / "train.jsonl", _records(64, seed=0))
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port, timeout_s = _free_port(), 3
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sft_jax", "train", "--config",
       f"configs/tiny.py:data={tmp_path / 'train.jsonl'},"
       f"tokenizer={tmp_path / 'tok'},steps=100000",
       "--workdir", str(tmp_path / "run"), "--no-progress",
       f"--config.data.cache_dir={tmp_path / 'cache'}",
       "--config.log.every_steps=1", "--config.checkpoint.every_steps=0",
       f"--config.distributed.heartbeat_timeout_s={timeout_s}",
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
       "--process-id", str(i)], env=env, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and
               metrics.read_text().count('"train/loss"') >= 2):
      assert time.monotonic() < deadline, "training never started"
      assert procs[0].poll() is None and procs[1].poll() is None, (
          procs[0].communicate()[1][-3000:])
      time.sleep(0.2)
    procs[1].kill()  # SIGKILL: a lost host, mid-training
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    elapsed = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  assert procs[0].returncode == 4, err[-3000:]
  assert elapsed < timeout_s + 20, elapsed
  lines = err.strip().splitlines()
  assert "Traceback" not in err, err[-3000:]
  assert lines[-1].startswith(
      "sft-jax train: distributed: process 0 of 2: process 1 sent no "
      "heartbeat for 3 s (distributed.heartbeat_timeout_s)"), err[-3000:]


def test_peer_failures_are_one_line_with_exit_code_4(capsys):
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  from sft_jax import errors  # pylint: disable=g-import-not-at-top
  from sft_jax.train import distributed  # pylint: disable=g-import-not-at-top
  for error in (
      distributed.BarrierTimeoutError(
          "process 1 of 2: the other processes did not reach 'checkpoint' "
          "within 2 s (distributed.barrier_timeout_s); a host has failed or "
          "is stuck.\n(DEADLINE_EXCEEDED: barrier)"),
      distributed.MainProcessFailedError(
          "process 1: process 0 failed at 'tokenize', so this process stops "
          "too: DataError: a.jsonl:7: no 'messages'")):
    def fail(argv, error=error):
      del argv
      raise error
    assert cli.run_command("train", fail, [], debug=False) == 4
    err = capsys.readouterr().err
    assert err == ("sft-jax train: distributed: "
                   f"{' '.join(str(error).split())}\n")
  with pytest.raises(errors.UserError,
                     match=r"distributed.heartbeat_timeout_s=0: must be > 0"):
    distributed.initialize(heartbeat_timeout_s=0)
