"""Trainable and optimizer-state bytes of `configs/tiny.py:method=freeze`
(train_top_layers=1 of 2 layers), from the train state at start.

Run from the repository root: `python scripts/freeze_opt_state_bytes.py`.
"""
import jax
from sft_jax.train import config as config_lib, model_setup, sharding, step as step_lib
for top in (1,):
  cfg = config_lib.load_config("configs/tiny.py:method=freeze", [f"--config.method.train_top_layers={top}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  print(step_lib.param_report(cfg, model_cfg, state))
