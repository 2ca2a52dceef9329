"""The chunked distillation loss against a direct PyTorch computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sft_jax.train import distill_loss

_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0})
_B, _T, _D, _E, _V = 2, 13, 8, 6, 40


def _logits_fn(h, w):
  return jnp.einsum("btd,dv->btv", h, w)


def _torch_loss(hs, ws, ht, wt, targets, weight, *, alpha, tau, kind, top_k):
  """The objective from full [B, T, V] logits, written out in PyTorch."""
  s = (hs @ ws).double()
  t = (ht @ wt).double()
  nll = torch.logsumexp(s, -1) - s.gather(-1, targets[..., None])[..., 0]
  s, t = s / tau, t / tau
  if top_k:
    t, idx = torch.topk(t, top_k, dim=-1)
    s = s.gather(-1, idx)
  ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
  ps, pt = ls.exp(), lt.exp()
  if kind == "forward_kl":
    div = (pt * (lt - ls)).sum(-1)
  elif kind == "reverse_kl":
    div = (ps * (ls - lt)).sum(-1)
  else:
    m = 0.5 * (ps + pt)
    div = 0.5 * (pt * (lt - m.log())).sum(-1) + 0.5 * (
        ps * (ls - m.log())).sum(-1)
  return (weight * (alpha * nll + (1 - alpha) * tau**2 * div)).sum()


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  mask = (rng.random((_B, _T)) < 0.7).astype(np.float32)
  return dict(hs=f(_B, _T, _D), ws=f(_D, _V), ht=f(_B, _T, _E),
              wt=f(_E, _V) * 2.0,
              targets=rng.integers(0, _V, (_B, _T)).astype(np.int32),
              weight=mask / mask.sum())


def _torch_value_and_grads(x, **kw):
  hs = torch.tensor(x["hs"], requires_grad=True)
  ws = torch.tensor(x["ws"], requires_grad=True)
  loss = _torch_loss(hs, ws, torch.tensor(x["ht"]), torch.tensor(x["wt"]),
                     torch.tensor(x["targets"]).long(),
                     torch.tensor(x["weight"]).double(), **kw)
  loss.backward()
  return loss.item(), hs.grad.numpy(), ws.grad.numpy()


@pytest.mark.parametrize("kind,top_k,tau", [
    ("forward_kl", 0, 2.0), ("reverse_kl", 0, 1.0), ("jsd", 0, 1.5),
    ("forward_kl", 5, 2.0), ("jsd", 7, 1.0)])
def test_online_loss_and_grads_equal_pytorch(kind, top_k, tau):
  x = _inputs()
  obj = distill_loss.Objective(alpha=0.3, temperature=tau, top_k=top_k,
                               divergence=kind)

  def f(hs, ws):
    teacher = {"hidden": jnp.asarray(x["ht"]), "w": jnp.asarray(x["wt"]),
               "logits_fn": _logits_fn}
    w = jnp.asarray(x["weight"])
    return distill_loss.weighted_distill(obj, hs, ws, x["targets"], w,
                                         0.0 * w, _logits_fn, 4, teacher)

  (loss, per_token), (gh, gw) = _jit(jax.value_and_grad(
      f, (0, 1), has_aux=True))(x["hs"], x["ws"])
  ref, ref_gh, ref_gw = _torch_value_and_grads(
      x, alpha=0.3, tau=tau, kind=kind, top_k=top_k)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(gh, ref_gh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-6)
  assert per_token["div"].shape == (_B, _T)
  assert np.all(np.asarray(per_token["div"]) >= -1e-6)


def test_offline_topk_equals_online_topk_and_pytorch():
  """Cached top-k log-probs at tau = 1 give the same loss at any tau."""
  x = _inputs(1)
  k, tau = 6, 2.0
  ids, logp = _jit(functools.partial(
      distill_loss.teacher_topk_logp, logits_fn=_logits_fn, k=k, chunk=5))(
          jnp.asarray(x["ht"]), jnp.asarray(x["wt"]))
  # The cached values are the teacher's full-vocabulary log-probs.
  full = jax.nn.log_softmax(_logits_fn(x["ht"], x["wt"]), -1)
  np.testing.assert_allclose(
      logp, np.take_along_axis(np.asarray(full), np.asarray(ids), -1),
      rtol=1e-6, atol=1e-6)
  obj = distill_loss.Objective(alpha=0.0, temperature=tau, top_k=k,
                               divergence="forward_kl")

  def f(hs, ws):
    w = jnp.asarray(x["weight"])
    return distill_loss.weighted_distill(
        obj, hs, ws, x["targets"], w, 0.0 * w, _logits_fn, 4,
        {"ids": ids, "logp": logp})[0]

  loss, (gh, gw) = _jit(jax.value_and_grad(f, (0, 1)))(x["hs"], x["ws"])
  ref, ref_gh, ref_gw = _torch_value_and_grads(
      x, alpha=0.0, tau=tau, kind="forward_kl", top_k=k)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(gh, ref_gh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-6)


def test_identical_distributions_have_zero_divergence():
  rng = np.random.default_rng(2)
  lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 9))), -1)
  other = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 9))), -1)
  for kind in distill_loss.DIVERGENCES:
    np.testing.assert_allclose(distill_loss.divergence(lp, lp, kind), 0.0,
                               atol=1e-6)
    assert np.all(np.asarray(distill_loss.divergence(lp, other, kind)) > 0)
  # JSD is bounded by log 2.
  assert np.all(np.asarray(distill_loss.divergence(
      lp, other, "jsd")) <= np.log(2.0))
