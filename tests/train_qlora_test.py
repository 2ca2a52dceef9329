"""QLoRA end to end on CPU: load quantized into shards, train against LoRA
on the bf16 base, checkpoint and reload, export checked by transformers and
peft (the merged model is the dequantized base plus the adapters)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import tiny_hf
import tiny_tok
from sft_jax import models
from sft_jax.infer import export
from sft_jax.models import quant
from sft_jax.train import bench
from sft_jax.train import checkpoint
from sft_jax.train import config as config_lib
from sft_jax.train import loop
from sft_jax.train import model_setup
from sft_jax.train import partition
from sft_jax.train import run as run_lib
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

_STEPS = 8
_FAST = {"xla_backend_optimization_level": 0}
_TOKENS = np.array([[1, 5, 77, 12, 33, 2, 50, 9], [3, 8, 8, 29, 41, 60, 7, 0]],
                   np.int32)


def _cfg(base_dir, method):
  cfg = config_lib.load_config(f"configs/tiny.py:model={base_dir},method={method}")
  for key, value in config_lib.parse_overrides([
      "--config.model.param_dtype=bfloat16", "--config.optim.lr=1e-2",
      "--config.method.qlora.block_size=32"]):
    config_lib.set_override(cfg, key, value)
  return cfg


def _train(cfg):
  mesh = sharding.make_mesh(cfg.mesh)  # 8 devices on fsdp
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  frozen = jax.tree.map(np.asarray, state.frozen)  # the step donates state
  total = step_lib.param_report(cfg, model_cfg, state)["total_params"]
  train_step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                       compiler_options=_FAST)
  losses = []
  for i in range(_STEPS):
    batch = bench.synthetic_batch(cfg.train.batch_size, cfg.train.seq_len,
                                  model_cfg.vocab_size, i % 2)
    state, m = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    losses.append(float(m["loss"]))
  return model_cfg, frozen, state, losses, total


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("qlora")
  base = tiny_hf.make_tiny_hf("llama", root / "base", hidden_size=64,
                              intermediate_size=128, init_std=0.05)
  tiny_tok.make_tokenizer(root / "tok")
  out = {"root": root, "base": base}
  for method in ("lora", "qlora"):
    cfg = _cfg(base, method)
    out[method] = (cfg,) + _train(cfg)
  return out


def test_qlora_trains_like_lora_reloads_and_exports(runs, tmp_path):
  # One test: under pytest-xdist a module fixture is built once per worker.
  _check_base_and_training(runs)
  _check_checkpoint_reloads_and_exports(runs, tmp_path)


def _check_base_and_training(runs):
  _, _, lora_frozen, _, lora_losses, lora_total = runs["lora"]
  _, model_cfg, _, _, q_losses, q_total = runs["qlora"]
  assert q_total == lora_total  # weights counted, not codes
  assert model_cfg.quant == "nf4"
  frozen = partition.flat(runs["qlora"][3].frozen)
  codes = frozen["params/layers/mlp/up_proj/kernel/codes"]
  assert codes.dtype == jnp.uint8 and codes.shape == (3, 32, 128)
  assert "fsdp" in str(codes.sharding.spec)  # quantized into the shards
  # Each kernel is exactly the quantization of the bf16 base weights.
  bf16 = partition.flat(lora_frozen)
  for path, w in bf16.items():
    if "layers" in path and path.endswith("kernel"):
      q = {k: frozen[f"{path}/{k}"] for k in ("codes", "scale")}
      want = quant.quantize(jnp.asarray(w), "nf4", 32)
      np.testing.assert_array_equal(q["codes"], want["codes"])
      np.testing.assert_array_equal(q["scale"], want["scale"])
  # Layer kernels: 0.5 + 4/32 bytes per weight against bf16's 2. (Per
  # device, at this size the block scales are too few to shard 8 ways.)
  q_bytes = sum(x.nbytes for p, x in frozen.items() if "/kernel/" in p)
  bf16_bytes = sum(x.nbytes for p, x in bf16.items()
                   if "layers" in p and "kernel" in p)
  assert q_bytes / bf16_bytes == (0.5 + 4 / 32) / 2
  # Same data, same adapters' init: the loss tracks LoRA on the bf16 base.
  assert q_losses[-1] < q_losses[0] - 0.1
  gap = abs(q_losses[-1] - lora_losses[-1]) / lora_losses[-1]
  print(f"loss after {_STEPS} steps: lora {lora_losses[-1]:.4f} qlora "
        f"{q_losses[-1]:.4f} (gap {gap:.2%})")
  assert gap < 0.03, (q_losses, lora_losses)


def _ours(model_cfg, variables):
  b, t = _TOKENS.shape
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  return np.asarray(models.Transformer(model_cfg).apply(
      variables, _TOKENS, positions, np.ones((b, t), np.int32)))


def _theirs(hf_model):
  with torch.no_grad():
    return hf_model(torch.from_numpy(_TOKENS).long()).logits.numpy()


def _check_checkpoint_reloads_and_exports(runs, tmp_path):
  cfg, _, _, state, _, _ = runs["qlora"]
  root = runs["root"]
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ckpt.save(_STEPS, loop.checkpointed_part(state), data_state={},
            config=config_lib.config_to_dict(cfg),
            tokenizer_files=checkpoint.read_files(str(root / "tok")))
  ckpt.close()
  run = run_lib.load_run(str(tmp_path / "run"))
  # The base is quantized again from model.path: bit for bit the same.
  jax.tree.map(np.testing.assert_array_equal, run.params,
               state.frozen["params"])
  jax.tree.map(np.testing.assert_array_equal, run.lora,
               state.trainable["lora"])
  ours = _ours(run.model_cfg, {"params": run.params, "lora": run.lora})

  merged = str(tmp_path / "merged")
  export.export_merged(run.model_cfg, run.params, run.lora, merged,
                       tokenizer=run.tokenizer, dtype="float32")
  np.testing.assert_allclose(_theirs(tiny_hf.load_hf(merged)), ours,
                             atol=2e-4, rtol=0)

  # The PEFT adapter over the dequantized base gives the same function.
  deq = str(tmp_path / "dequantized")
  models.save_hf(dataclasses.replace(run.model_cfg, quant="", lora=None),
                 models.dequantize_params(run.params), deq, dtype="float32")
  adapter = str(tmp_path / "adapter")
  export.export_adapter(run.model_cfg, run.lora, adapter, base_model=deq)
  theirs = _theirs(peft.PeftModel.from_pretrained(
      tiny_hf.load_hf(deq), adapter).eval())
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)
