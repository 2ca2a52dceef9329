"""Sampling filters against transformers' logits warpers, and the sampled
distribution against the softmax it should follow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from sft_jax.infer import sampling


def _logits(b=6, v=23, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, v)).astype(np.float32) * 2
  x[0, :4] = 1.5  # ties at the top
  x[1, 5:9] = -0.25  # ties in the middle
  return x


@pytest.mark.parametrize("k", [1, 3, 8, 100])
def test_top_k_matches_transformers(k):
  x = _logits()
  ours = np.asarray(sampling.top_k_mask(jnp.asarray(x), k))
  theirs = logits_process.TopKLogitsWarper(k)(None, torch.from_numpy(x))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs.numpy()))
  np.testing.assert_array_equal(ours[~np.isinf(ours)], x[~np.isinf(ours)])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_matches_transformers(p):
  x = _logits(seed=1)
  ours = np.asarray(sampling.top_p_mask(jnp.asarray(x), p))
  theirs = logits_process.TopPLogitsWarper(p)(None, torch.from_numpy(x))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs.numpy()))
  # Each row keeps at least its argmax.
  assert np.all((~np.isinf(ours)).sum(-1) >= 1)


def test_filter_order_is_temperature_top_k_top_p():
  x = _logits(seed=2)
  s = sampling.Sampling(temperature=0.7, top_k=9, top_p=0.6)
  ours = np.asarray(sampling.filtered_logits(jnp.asarray(x), s))
  t = torch.from_numpy(x)
  for warper in (logits_process.TemperatureLogitsWarper(0.7),
                 logits_process.TopKLogitsWarper(9),
                 logits_process.TopPLogitsWarper(0.6)):
    t = warper(None, t)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(t.numpy()))
  keep = ~np.isinf(ours)
  np.testing.assert_allclose(ours[keep], t.numpy()[keep], rtol=1e-6)


def test_greedy_is_argmax():
  x = _logits(seed=3)
  got = sampling.sample(jnp.asarray(x), jax.random.key(0), sampling.GREEDY)
  np.testing.assert_array_equal(np.asarray(got), x.argmax(-1))


def test_sampled_frequencies_follow_filtered_softmax():
  logits_V = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
  n = 40_000
  x = np.broadcast_to(logits_V, (n, 5))
  s = sampling.Sampling(temperature=2.0, top_k=4, top_p=1.0)
  toks = np.asarray(sampling.sample(jnp.asarray(x), jax.random.key(1), s))
  freq = np.bincount(toks, minlength=5) / n
  # Temperature 2 over the top 4 tokens: p_i^(1/2), renormalised.
  want = np.sqrt([0.4, 0.3, 0.15, 0.1, 0.0])
  want /= want.sum()
  assert freq[4] == 0.0
  np.testing.assert_allclose(freq, want, atol=0.01)


def test_top_p_sampling_stays_in_nucleus_and_seed_decides():
  logits_V = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
  x = jnp.asarray(np.broadcast_to(logits_V, (4000, 4)))
  s = sampling.Sampling(temperature=1.0, top_p=0.7)
  a = np.asarray(sampling.sample(x, jax.random.key(5), s))
  b = np.asarray(sampling.sample(x, jax.random.key(5), s))
  c = np.asarray(sampling.sample(x, jax.random.key(6), s))
  # Nucleus for 0.7 is {0.5, 0.3}: renormalised 0.625 / 0.375.
  assert set(np.unique(a)) == {0, 1}
  np.testing.assert_allclose(np.mean(a == 0), 0.625, atol=0.025)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="temperature"):
    sampling.Sampling(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.Sampling(top_k=-2)
