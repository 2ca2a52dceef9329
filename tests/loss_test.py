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
