"""Two real processes on one machine (gloo collectives) train one run.

Each process has one CPU device and feeds only its half of every global
batch; process 0 writes the logs, both write their own data-iterator state
into the shared checkpoint. A second two-process launch resumes from an
earlier checkpoint and must redo the lost steps exactly.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from train_loop_test import _records, _write_jsonl, REPO  # pylint: disable=g-bad-import-order
import tiny_tok


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp, workdir, env):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "sft_jax", "train",
           "--config", (f"configs/tiny.py:data={tmp / 'train.jsonl'},"
                        f"tokenizer={tmp / 'tok'},steps=6"),
           "--workdir", str(workdir), "--no-progress",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--process-id", str(i),
           f"--config.data.cache_dir={tmp / 'cache'}",
           "--config.checkpoint.every_steps=3", "--config.log.every_steps=1"]
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for rc, out, err in outs:
    assert rc == 0, out[-3000:] + err[-3000:]
  return outs


def _losses(workdir):
  out = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      r = json.loads(line)
      if "train/loss" in r:
        out[r["step"]] = r["train/loss"]
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  tiny_tok.make_tokenizer(tmp / "tok")
  _write_jsonl(tmp / "train.jsonl", _records(160, seed=0))
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
      JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
      JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
  return tmp, env


def test_two_processes_train_checkpoint_and_resume_exactly(setup):
  tmp, env = setup
  workdir = tmp / "run"
  outs = _launch(tmp, workdir, env)
  assert "params:" in outs[0][1] and "params:" not in outs[1][1]
  ckpt = workdir / "checkpoints"
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  assert run_lib.checkpoint_steps(str(workdir)) == [3, 6]
  names = sorted(os.listdir(ckpt / "6" / "data"))
  assert "process_0-of-2.json" in names and "process_1-of-2.json" in names
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert losses[6] < losses[1] - 0.1, losses

  # Lose the last checkpoint, as if both machines died after step 3 was
  # saved; the relaunch resumes from 3 and must redo steps 4-6 exactly.
  resumed = tmp / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  outs = _launch(tmp, resumed, env)
  assert "Resuming from the checkpoint of step 3" in outs[0][1]
  assert _losses(resumed) == losses
  ref = run_lib.load_run(str(workdir)).params
  got = run_lib.load_run(str(resumed)).params
  jax.tree.map(np.testing.assert_array_equal, got, ref)
