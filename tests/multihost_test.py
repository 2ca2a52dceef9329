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


# Two sources mixed 3:1 and packed, so resuming must restore the position of
# every source, the mixing and the packer.
_MIX = '''
from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.get_config_from_file("configs/tiny.py:" + (arg or ""))
  c.data.sources.train.weight = 3.0
  c.data.sources.extra = data_config.source_config(path={extra!r}, weight=1.0)
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp, workdir, env, num_processes=2, devices=1, overrides=()):
  port = _free_port()
  procs = []
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "sft_jax", "train",
           "--config", (f"{tmp / 'mix.py'}:data={tmp / 'train.jsonl'},"
                        f"tokenizer={tmp / 'tok'},steps=6"),
           "--workdir", str(workdir), "--no-progress",
           f"--config.data.cache_dir={tmp / 'cache'}",
           "--config.checkpoint.every_steps=3", "--config.log.every_steps=1",
           *overrides]
    if num_processes > 1:
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
              str(num_processes), "--process-id", str(i)]
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
  _write_jsonl(tmp / "extra.jsonl", _records(40, seed=1))
  (tmp / "mix.py").write_text(_MIX.format(extra=str(tmp / "extra.jsonl")))
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
  # One iterator state for the global stream, whatever the process count.
  assert "iterator.json" in os.listdir(ckpt / "6" / "data")
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


def _assert_losses_close(got, want, steps):
  for s in steps:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-5,
                               err_msg=f"loss at step {s}")


@pytest.fixture(scope="module")
def fsdp8_run(setup):
  """Mesh A: one process, 8 devices, fsdp=8, 6 steps (checkpoints 3, 6)."""
  tmp, env = setup
  workdir = tmp / "fsdp8"
  _launch(tmp, workdir, env, num_processes=1, devices=8,
          overrides=["--config.mesh.fsdp=8"])
  return workdir


def test_batch_spanning_processes_equal_one_process(setup, fsdp8_run):
  """The two-process run of the first test (fsdp over both processes)."""
  tmp, _ = setup
  if not (tmp / "run" / "metrics.jsonl").exists():
    pytest.skip("needs test_two_processes_train_checkpoint_and_resume_exactly")
  _assert_losses_close(_losses(tmp / "run"), _losses(fsdp8_run), range(1, 7))


@pytest.mark.parametrize("how", ["4_devices", "2_processes_tensor"])
def test_resume_on_another_mesh_equals_uninterrupted(setup, fsdp8_run, how):
  """3 steps on mesh A, then 3 on mesh B == 6 on A: params and optimizer
  state resharded by Orbax, the packed and mixed stream continued exactly.
  B is 4 devices (fsdp=4) in one process, or two processes whose single
  devices form a tensor axis (both feed the same, replicated rows)."""
  tmp, env = setup
  workdir = tmp / f"resumed_{how}"
  shutil.copytree(fsdp8_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  if how == "4_devices":
    outs = _launch(tmp, workdir, env, num_processes=1, devices=4,
                   overrides=["--config.mesh.fsdp=4"])
  else:
    outs = _launch(tmp, workdir, env, num_processes=2, devices=1,
                   overrides=["--config.mesh.fsdp=1",
                              "--config.mesh.tensor=2"])
  assert "Resuming from the checkpoint of step 3" in outs[0][1]
  _assert_losses_close(_losses(workdir), _losses(fsdp8_run), range(1, 7))
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  ref = run_lib.load_run(str(fsdp8_run)).params
  got = run_lib.load_run(str(workdir)).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), got, ref)


def run_processes(code, args, *, env, timeout):
  """Runs `python -c code ARGS COORDINATOR I` as process I of len(args)
  joined processes (args: one argv list each); returns [(rc, out, err)].
  Every process is killed if any runs past `timeout` seconds."""
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-c", code, coordinator, str(i), *a], env=env,
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, a in enumerate(args)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  return outs


# A 4-device fsdp mesh over two processes (2 devices each): every stacked
# leaf is split across both, so save_hf must gather it layer by layer.
_SAVE_HF = """
import json, os, sys
from sft_jax.train import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from ml_collections import config_dict
from configs import base
from sft_jax import models
from sft_jax.train import sharding
src, out = sys.argv[3], sys.argv[4]
mesh = sharding.make_mesh(config_dict.ConfigDict(dict(data=1, fsdp=4,
                                                      tensor=1)))
cfg = models.ModelConfig.from_hf_config(
    json.load(open(os.path.join(src, "config.json"))))
shardings = sharding.tree_shardings(
    models.logical_axes(cfg)["params"], models.param_shapes(cfg), mesh,
    sharding.rules_from_config(base.get_config().sharding.rules))
cfg, params = models.load_hf(src, shardings=shardings)
split = [x for x in jax.tree.leaves(params)
         if not x.is_fully_addressable and not x.is_fully_replicated]
print("split leaves:", len(split), "of", len(jax.tree.leaves(params)))
print("files:", models.save_hf(cfg, params, out, max_shard_size=40_000))
"""


def test_save_hf_from_two_processes_equals_one_process(tmp_path):
  """Params sharded over both processes export to the same bytes as a
  one-process export, several safetensors files and their index included;
  process 1 writes nothing."""
  from sft_jax import models  # pylint: disable=g-import-not-at-top
  import tiny_hf  # pylint: disable=g-import-not-at-top
  src = tiny_hf.make_tiny_hf("llama", tmp_path / "src")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
                 "PYTHONPATH", "")]))
  outs = run_processes(_SAVE_HF, [[src, str(tmp_path / f"out{i}")]
                                  for i in range(2)], env=env, timeout=240)
  for rc, out, err in outs:
    assert rc == 0, out[-2000:] + err[-3000:]
  n_split, _, n_leaves = outs[0][1].split("split leaves: ")[1].split()[:3]
  assert int(n_split) >= int(n_leaves) // 2, outs[0][1]
  cfg, params = models.load_hf(src)
  files = models.save_hf(cfg, params, str(tmp_path / "ref"),
                         max_shard_size=40_000)
  assert len(files) > 2
  ref = sorted(os.listdir(tmp_path / "ref"))
  assert sorted(os.listdir(tmp_path / "out0")) == ref
  for name in ref:
    assert ((tmp_path / "out0" / name).read_bytes() ==
            (tmp_path / "ref" / name).read_bytes()), name
  assert not (tmp_path / "out1").exists()
