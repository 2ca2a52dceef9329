"""LoRA dropout: PEFT's semantics (the adapter's input only), in the step and export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import models
from sft_jax.models import lora as lora_lib
from sft_jax.models import transformer
from sft_jax.train import config as config_lib
from sft_jax.train import model_setup

P = 0.25


def _dense(dim=16):
  hf = {"model_type": "llama", "vocab_size": 32, "hidden_size": dim,
        "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}
  cfg = dataclasses.replace(
      models.ModelConfig.from_hf_config(hf), dtype="float32",
      lora=models.LoraConfig(rank=dim, alpha=float(dim), targets=".*",
                             dropout=P))
  return transformer._Dense(cfg, features=dim, name="d"), cfg  # pylint: disable=protected-access


def test_dropout_acts_on_the_adapter_input_only_and_only_with_an_rng():
  dense, _ = _dense()
  x = jax.random.normal(jax.random.key(1), (4, 32, 16))
  kernel = jax.random.normal(jax.random.key(2), (16, 16))
  # A = B = identity, scale 1: the adapter adds exactly its (dropped) input.
  variables = {"params": {"kernel": kernel},
               "lora": {"a": jnp.eye(16), "b": jnp.eye(16)}}
  base = np.asarray(x @ kernel)
  plain = np.asarray(dense.apply(variables, x))
  np.testing.assert_allclose(plain, base + np.asarray(x), rtol=1e-5,
                             atol=1e-5)
  dropped = np.asarray(dense.apply(variables, x,
                                   rngs={"dropout": jax.random.key(3)}))
  adapter_in = dropped - base
  xs = np.asarray(x)
  zero = np.abs(adapter_in) < 1e-4
  # Every input element is either dropped or scaled by 1 / (1 - p), as in
  # torch.nn.Dropout; the base path x @ kernel is untouched.
  np.testing.assert_allclose(adapter_in[~zero], xs[~zero] / (1 - P),
                             rtol=1e-4, atol=1e-4)
  assert zero.mean() == pytest.approx(P, abs=0.03)
  again = dense.apply(variables, x, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(np.asarray(again), dropped)


def test_config_key_reaches_the_model_and_the_peft_adapter_config():
  cfg = config_lib.load_config("configs/tiny.py:method=lora",
                               ["--config.method.lora.dropout=0.1"])
  model_cfg = model_setup.model_config(cfg)
  assert model_cfg.lora.dropout == 0.1
  lora = models.init_lora(model_cfg, jax.random.key(0))
  assert lora_lib.peft_config(lora, model_cfg)["lora_dropout"] == 0.1


def _one_step(dropout, grad_accum=1):
  from sft_jax.train import bench  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py:method=lora", [
      f"--config.method.lora.dropout={dropout}",
      f"--config.train.grad_accum={grad_accum}",
      # SGD: the update is the gradient (Adam's first step is its sign).
      "--config.optim.name=sgd", "--config.optim.b1=0", "--config.optim.lr=1",
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
      "--config.optim.clip_norm=0", "--config.optim.weight_decay=0"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(
      cfg.train.batch_size, cfg.train.seq_len, model_cfg.vocab_size, 0,
      num_sources=len(cfg.data.sources)).items()}
  step = jax.jit(step_lib.make_train_step(cfg, model_cfg))
  new_state, metrics = step(state, batch)
  b = jax.tree.leaves(new_state.trainable["lora"])
  return float(metrics["loss"]), np.concatenate([np.ravel(x) for x in b])


def test_train_step_drops_the_adapter_input_deterministically():
  loss0, lora0 = _one_step(0.0)
  loss1, lora1 = _one_step(0.5)
  # B starts at 0: the first loss is the base model's with or without
  # dropout (it never touches the base path) ...
  assert loss1 == pytest.approx(loss0, rel=1e-6)
  # ... but B's gradient sees the dropped inputs.
  assert np.abs(lora1 - lora0).max() > 1e-4
  # The masks come from (seed, step, micro-batch): the same run repeats.
  np.testing.assert_array_equal(_one_step(0.5)[1], lora1)
  loss2, lora2 = _one_step(0.5, grad_accum=2)
  assert loss2 == pytest.approx(loss0, rel=1e-5)
  assert np.abs(lora2 - lora0).max() > 1e-4
