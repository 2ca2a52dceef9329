"""Every remat policy trains the same numbers; named ones save what they say."""

import dataclasses
import functools

import jax
from jax._src.ad_checkpoint import saved_residuals  # no public equivalent
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import models
from sft_jax.models import remat as remat_lib

# Gemma-2-like: two attention patterns (one scan over 2 groups of both),
# soft-caps, post norms.
_CFG = models.ModelConfig(
    model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=96,
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
    layer_types=("sliding_attention", "full_attention") * 2, sliding_window=5,
    attn_softcap=20.0, final_softcap=30.0, post_norms=True,
    norm_plus_one=True, activation="gelu_tanh")
_T = 24


def _batch():
  tokens = (np.arange(2 * _T).reshape(2, _T) * 7 % 64).astype(np.int32)
  seg = np.repeat(np.array([[1] * 15 + [2] * 6 + [0] * 3, [1] * _T]), 1, 0)
  pos = np.concatenate([np.r_[np.arange(15), np.arange(6), np.zeros(3)][None],
                        np.arange(_T)[None]]).astype(np.int32)
  return tokens, pos, seg.astype(np.int32)


def _loss_fn(cfg):
  model = models.Transformer(cfg)
  tokens, pos, seg = _batch()

  def loss(params):
    logits = model.apply({"params": params}, tokens, pos, seg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1])
  return loss


@functools.lru_cache(maxsize=1)
def _params():
  return models.init(_CFG, jax.random.key(0))["params"]


# The named policies (jax's generic ones are covered in models_test); one
# jit for all of them, as compiles dominate this test's time.
_CHECKED = ("minimal_with_context", "save_dot_except_mlp", "save_qkv_proj",
            "save_out_proj", "qkv_proj_offloaded")


def test_named_policies_give_the_same_loss_and_grads():
  fns = [jax.value_and_grad(_loss_fn(dataclasses.replace(_CFG, remat=n)))
         for n in ("none",) + _CHECKED]
  (ref_loss, ref_grads), *others = jax.jit(
      lambda p: [f(p) for f in fns])(_params())
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 1e-3
  for name, (loss, grads) in zip(_CHECKED, others):
    np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=0, err_msg=name)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5,
                                   rtol=0, err_msg=name), grads, ref_grads)


def _saved_elements(name: str) -> int:
  cfg = dataclasses.replace(_CFG, remat=name, scan_layers=False)
  return sum(int(np.prod(a.shape))
             for a, _ in saved_residuals(_loss_fn(cfg), _params()))


def test_named_policies_save_less_as_they_recompute_more():
  chain = ("none", "minimal_with_context", "minimal", "save_dot_except_mlp",
           "save_qkv_proj", "full")
  saved = [_saved_elements(n) for n in chain]
  assert saved == sorted(saved, reverse=True) and len(set(saved)) == len(
      saved), dict(zip(chain, saved))


def test_unknown_policy_is_an_error():
  with pytest.raises(ValueError, match="unknown remat policy 'dots'"):
    remat_lib.policy("dots")
