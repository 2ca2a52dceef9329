"""Distillation in the train step: online teacher against PyTorch, GA and
mesh invariance, a short alpha=0 run, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_hf
from sft_jax.train import config as config_lib
from sft_jax.train import distill
from sft_jax.train import model_setup
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

_FAST = {"xla_backend_optimization_level": 0}
_SGD = ("--config.optim.name=sgd", "--config.optim.b1=0",
        "--config.optim.lr=1.0", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0",
        "--config.optim.weight_decay=0")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("distill_models")
  tiny_hf.make_tiny_hf("llama", d / "student", seed=0)
  tiny_hf.make_tiny_hf("qwen2", d / "teacher", seed=1, hidden_size=48,
                       num_hidden_layers=2)
  tiny_hf.make_tiny_hf("llama", d / "other_vocab", seed=2, vocab_size=101)
  return d


def _cfg(models_dir, *overrides, teacher="teacher"):
  return config_lib.load_config(
      f"configs/tiny.py:model={models_dir / 'student'}", [
          f"--config.distill.teacher={models_dir / teacher}",
          "--config.distill.teacher_dtype=float32",
          "--config.train.seq_len=16", "--config.train.ce_chunk=8",
          *overrides])


def _state(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  distill.check_config(cfg)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  variables["teacher"] = distill.load_teacher(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  step = step_lib.jit_train_step(cfg, model_cfg, mesh, shardings,
                                 compiler_options=_FAST)
  return mesh, state, step


def _unpacked_batch(rows, seq_len, vocab, seed=0):
  """One example per row, no padding: what HF models compute unpacked."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
  return dict(tokens=ids[:, :-1], targets=ids[:, 1:],
              loss_mask=(rng.random((rows, seq_len)) < 0.7).astype(np.float32),
              segment_ids=np.ones((rows, seq_len), np.int32),
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
              source_id=np.zeros((rows, seq_len), np.int32))


def _torch_reference(models_dir, batch, *, alpha, tau, top_k):
  student = tiny_hf.load_hf(models_dir / "student", torch.float64)
  teacher = tiny_hf.load_hf(models_dir / "teacher", torch.float64)
  tokens = torch.tensor(batch["tokens"]).long()
  targets = torch.tensor(batch["targets"]).long()
  mask = torch.tensor(batch["loss_mask"]).double()
  s = student(tokens).logits
  with torch.no_grad():
    t = teacher(tokens).logits
  nll = torch.logsumexp(s, -1) - s.gather(-1, targets[..., None])[..., 0]
  s, t = s / tau, t / tau
  if top_k:
    t, idx = torch.topk(t, top_k, -1)
    s = s.gather(-1, idx)
  lt = torch.log_softmax(t, -1)
  kl = (lt.exp() * (lt - torch.log_softmax(s, -1))).sum(-1)
  n = mask.sum()
  loss = (mask * (alpha * nll + (1 - alpha) * tau**2 * kl)).sum() / n
  loss.backward()
  return dict(loss=loss.item(), ce_loss=((mask * nll).sum() / n).item(),
              distill_loss=((mask * kl).sum() / n).item(),
              lm_head=student.lm_head.weight.grad.numpy().T,
              embed=student.model.embed_tokens.weight.grad.numpy())


@pytest.mark.parametrize("top_k", [0])  # top-k: distill_loss_test.py.
def test_online_step_equals_pytorch(models_dir, top_k):
  cfg = _cfg(models_dir, *_SGD, "--config.train.batch_size=2",
             "--config.distill.alpha=0.4", "--config.distill.temperature=2.0",
             f"--config.distill.top_k={top_k}")
  mesh, state, step = _state(cfg, jax.devices()[:1])
  batch = _unpacked_batch(2, 16, 97)
  before = jax.tree.map(np.asarray, state.trainable["params"])
  state, metrics = step(state, sharding.global_batch(batch, mesh))
  after = jax.tree.map(np.asarray, state.trainable["params"])
  ref = _torch_reference(models_dir, batch, alpha=0.4, tau=2.0, top_k=top_k)
  for key in ("loss", "ce_loss", "distill_loss"):
    np.testing.assert_allclose(metrics[key], ref[key], rtol=2e-5, err_msg=key)
  # SGD with lr 1: the update is minus the gradient.
  np.testing.assert_allclose(before["lm_head"]["kernel"]
                             - after["lm_head"]["kernel"], ref["lm_head"],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(before["embedder"]["embedding"]
                             - after["embedder"]["embedding"], ref["embed"],
                             rtol=1e-4, atol=1e-6)
  assert "teacher" in state.frozen  # Frozen: no optimizer state for it.
  assert "teacher" not in step_lib.variables_of(state)


def test_grad_accum_and_mesh_change_nothing(models_dir):
  def run(mesh, accum, devices):
    d, f, t = mesh
    cfg = _cfg(models_dir, *_SGD, "--config.train.batch_size=8",
               "--config.distill.alpha=0.2", "--config.distill.top_k=4",
               "--config.distill.divergence=jsd",
               f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}",
               f"--config.mesh.tensor={t}",
               f"--config.train.grad_accum={accum}")
    mesh_, state, step = _state(cfg, devices)
    from sft_jax.train import bench  # pylint: disable=g-import-not-at-top
    batch = bench.synthetic_batch(8, 16, 97, 3)
    state, metrics = step(state, sharding.global_batch(batch, mesh_))
    return jax.tree.map(np.asarray, (metrics, state.trainable))

  ref_m, ref_p = run((1, 1, 1), 1, jax.devices()[:1])
  for mesh, accum in (((2, 2, 2), 2),):
    m, p = run(mesh, accum, jax.devices()[:int(np.prod(mesh))])
    for key in ("loss", "ce_loss", "distill_loss", "grad_norm"):
      np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-5,
                                 err_msg=f"{key} mesh {mesh} accum {accum}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6), p, ref_p)


def test_alpha_zero_run_brings_student_towards_teacher(models_dir):
  # A bfloat16 teacher (weights and compute), as for a large one on device.
  cfg = _cfg(models_dir, "--config.distill.teacher_dtype=bfloat16",
             "--config.train.batch_size=4",
             "--config.distill.alpha=0.0", "--config.optim.lr=3e-3",
             "--config.optim.warmup_steps=0", "--config.train.steps=8")
  mesh, state, step = _state(cfg, jax.devices()[:1])
  assert {x.dtype for x in jax.tree.leaves(state.frozen["teacher"])} == {
      jnp.dtype(jnp.bfloat16)}
  batch = sharding.global_batch(_unpacked_batch(4, 16, 97, 5), mesh)
  kls = []
  for _ in range(8):
    state, metrics = step(state, batch)
    kls.append(float(metrics["distill_loss"]))
    # alpha = 0, tau = 1: the loss is the KL itself.
    np.testing.assert_allclose(metrics["loss"], metrics["distill_loss"],
                               rtol=1e-6)
  assert kls[-1] < 0.7 * kls[0], kls


def test_config_errors_name_the_key(models_dir, tmp_path, capsys):
  with pytest.raises(distill.DistillConfigError,
                     match=r"distill.teacher=.*vocabulary 101 != student "
                           r"vocabulary 97"):
    distill.check_config(_cfg(models_dir, teacher="other_vocab"))
  with pytest.raises(distill.DistillConfigError, match="distill.divergence"):
    distill.check_config(_cfg(models_dir, "--config.distill.divergence=kl"))
  # The command line: one line, exit code 2, before any training.
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  code = cli.main(["train", "--config",
                   f"configs/tiny.py:model={models_dir / 'student'}",
                   "--workdir", str(tmp_path / "run"),
                   f"--config.distill.teacher={models_dir / 'other_vocab'}"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "vocabulary 101 != student vocabulary 97" in err[0]
