"""loss.weighted_ce's accuracy metric keeps argmax's first-index rule."""

import jax.numpy as jnp
import numpy as np

from sft_jax.train import loss as loss_lib


def test_correct_counts_only_the_first_of_tied_maxima():
  # Logit rows with ties at the max: [0 0 0 0 0 0] (all tie) and rows where
  # the target ties a max at an earlier index. argmax picks the first.
  w = jnp.asarray(np.eye(4, 6), jnp.float32)
  hidden = jnp.asarray([[[0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                         [0, 0, 2, 2]]], jnp.float32)
  targets = jnp.asarray([[0, 1, 1, 3]], jnp.int32)
  logits_fn = lambda h, w: jnp.einsum("btd,dv->btv", h, w)
  _, fused = loss_lib.weighted_ce(hidden, w, targets, jnp.ones((1, 4)),
                                  jnp.zeros((1, 4)), logits_fn, 2)
  naive = loss_lib.naive_token_losses(hidden, w, targets, logits_fn)
  np.testing.assert_array_equal(fused["correct"], [[1, 0, 1, 0]])
  np.testing.assert_array_equal(fused["correct"], naive["correct"])
  np.testing.assert_allclose(fused["nll"], naive["nll"], rtol=1e-6)


def test_correct_is_argmax_equals_target_with_many_ties():
  # Small integer logits tie often, inside a block of ids and across blocks;
  # V = 96 takes the blocked path (blocks of 32), V = 50 the fallback.
  rng = np.random.default_rng(0)
  for v in (96, 50):
    logits = rng.integers(0, 4, (3, 40, v)).astype(np.float32)
    first = logits.argmax(-1)
    tied = np.array([[rng.choice(np.flatnonzero(row == row.max()))
                      for row in rows] for rows in logits])
    targets = np.where(rng.random(first.shape) < 0.5, first, tied)
    targets[:, :5] = rng.integers(0, v, (3, 5))  # mostly wrong
    _, correct = loss_lib._max_and_correct(  # pylint: disable=protected-access
        jnp.asarray(logits), jnp.asarray(targets, jnp.int32),
        jnp.asarray(np.take_along_axis(logits, targets[..., None], -1)[..., 0]))
    expected = (first == targets).astype(np.float32)
    assert 0 < expected.sum() < expected.size  # both outcomes occur
    assert (tied != first).any()  # ties at a later id occur
    np.testing.assert_array_equal(correct, expected)
