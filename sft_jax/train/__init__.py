"""Training: config, the pure train step, sharding, the run loop.

  from sft_jax.train import config as config_lib, sharding, step as step_lib

See step.py for the order of calls; loop.py runs them.
"""
