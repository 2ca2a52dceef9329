"""`sft-jax plan`: its per-device state bytes are those of the real state on
the same mesh, and `fits` compares the predicted peak with the device."""

import pytest

from sft_jax.models import quant
from sft_jax.train import config as config_lib
from sft_jax.train import model_setup
from sft_jax.train import plan as plan_lib
from sft_jax.train import sharding
from sft_jax.train import step as step_lib


def test_plan_matches_the_real_state_per_device():
  cfg = config_lib.load_config("configs/tiny.py:method=freeze", [
      "--config.model.param_dtype=bfloat16", "--config.eval.every_steps=5"])
  got = plan_lib.plan(cfg, memory_bytes=10 ** 9)  # 8 devices, fsdp
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  parts = got["per_device_bytes"]
  assert parts["frozen_params"] == quant.nbytes_per_device(state.frozen)
  assert parts["trainable_params"] == quant.nbytes_per_device(state.trainable)
  assert parts["optimizer_state"] == quant.nbytes_per_device(state.opt_state)
  assert parts["gradients"] == parts["trainable_params"]  # float32 master
  assert parts["step_temp"] >= parts["gradients"] and parts["eval_temp"] > 0
  assert got["num_devices"] == 8 and got["fits"] is True
  assert got["predicted_peak_bytes"] >= (
      parts["frozen_params"] + parts["trainable_params"]
      + parts["optimizer_state"] + parts["step_temp"])
  assert plan_lib.plan(cfg, memory_bytes=10 ** 5)["fits"] is False


def test_device_kinds_and_bad_input():
  assert plan_lib.device_memory("NVIDIA H100 80GB HBM3") == 80 * 1024 ** 3
  assert plan_lib.device_memory("NVIDIA A100-SXM4-40GB") == 40 * 1024 ** 3
  assert plan_lib.device_memory("NVIDIA H200") == 141 * 1024 ** 3
  assert plan_lib.device_memory("NVIDIA GH200 480GB") == 96 * 1024 ** 3
  assert plan_lib.device_memory("TPU v5 lite") == 16 * 1024 ** 3
  assert plan_lib.device_memory("abacus") is None
  with pytest.raises(SystemExit) as e:
    plan_lib.main(["--config", "configs/tiny.py", "--device-kind", "abacus"])
  assert e.value.code == 2
