"""sft_jax.models against transformers on tiny random checkpoints."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sft_jax import models
import tiny_hf

FAMILIES = tiny_hf.FAMILIES
_V = 97
_TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg, return_hidden=False):
  model = models.Transformer(cfg)
  return jax.jit(lambda v, t, p, s: model.apply(v, t, p, s,
                                                return_hidden=return_hidden))


def _forward(cfg, variables, tokens, positions=None, segment_ids=None):
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                tokens.shape)
  if segment_ids is None:
    segment_ids = np.ones_like(tokens)
  return np.asarray(_forward_fn(cfg)(variables, tokens, positions,
                                     segment_ids))


def _torch_logits(hf_model, tokens):
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)
                    ).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (dir, transformers model, sft_jax cfg, params)."""
  out = {}
  for family in FAMILIES:
    path = tmp_path_factory.mktemp(family)
    tiny_hf.make_tiny_hf(family, path)
    cfg, params = models.load_hf(str(path))
    out[family] = (str(path), tiny_hf.load_hf(path), cfg, params)
  return out


def _tokens(seed, shape):
  return np.random.RandomState(seed).randint(0, _V, shape).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
  _, hf_model, cfg, params = checkpoints[family]
  tokens = _tokens(0, (2, 16))  # longer than the windows (5)
  ours = _forward(cfg, {"params": params}, tokens)
  ref = _torch_logits(hf_model, tokens)
  assert np.abs(ref).max() > 1.0  # logits big enough to show errors
  np.testing.assert_allclose(ours, ref, atol=_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_separate_sequences(checkpoints, family):
  _, hf_model, cfg, params = checkpoints[family]
  lengths = (7, 4, 9)
  seqs = [_tokens(i + 1, (1, n)) for i, n in enumerate(lengths)]
  pad = 3
  tokens = np.concatenate(seqs + [np.zeros((1, pad), np.int32)], axis=1)
  positions = np.concatenate([np.arange(n) for n in lengths]
                             + [np.zeros(pad, int)])[None].astype(np.int32)
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in
                                enumerate(lengths)]
                               + [np.zeros(pad, int)])[None].astype(np.int32)
  ours = _forward(cfg, {"params": params}, tokens, positions, segment_ids)
  assert np.all(np.isfinite(ours))
  start = 0
  for seq, n in zip(seqs, lengths):
    ref = _torch_logits(hf_model, seq)
    np.testing.assert_allclose(ours[:, start:start + n], ref, atol=_TOL,
                               rtol=0)
    start += n


def test_early_llama_path_has_expected_params(checkpoints):
  _, _, cfg, params = checkpoints["llama"]
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert shapes["layers"]["attn"]["q_proj"]["kernel"] == (3, 32, 64)
  assert shapes["layers"]["attn"]["k_proj"]["bias"] == (3, 32)
  assert shapes["lm_head"]["kernel"] == (32, _V)
  assert cfg.num_kv_heads == 2 and cfg.head_dim == 16
