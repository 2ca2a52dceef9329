"""KV-cache decoding: greedy equals transformers' greedy generate token for
token, stop ids end rows, batching does not change a row, buckets compile
once."""

import numpy as np
import pytest
import torch

import tiny_hf
from sft_jax import models
from sft_jax.infer import generate
from sft_jax.infer import sampling

_PROMPTS = ([5, 17, 3], [9, 1, 44, 60, 2, 8, 31], list(range(20, 32)))
_NEW = 10


def _hf_greedy(hf_model, prompt, max_new_tokens, eos=None):
  ids = torch.tensor([prompt])
  out = hf_model.generate(
      ids, attention_mask=torch.ones_like(ids), do_sample=False,
      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  cache = {}

  def get(family):
    if family not in cache:
      path = tiny_hf.make_tiny_hf(family, tmp_path_factory.mktemp(family))
      cfg, params = models.load_hf(path)
      cache[family] = (cfg, {"params": params}, tiny_hf.load_hf(path))
    return cache[family]
  return get


# llama: biases, untied head; mistral: sliding window shorter than the
# generation; gemma2: soft-caps, alternating windows; gemma3: qk-norm, local
# rope. Every test decodes _NEW tokens into batches of <= 4 rows so that the
# compiled decoders are shared between tests.
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3"])
def test_greedy_equals_transformers(family, tiny_models):
  cfg, variables, hf_model = tiny_models(family)
  want = [_hf_greedy(hf_model, p, _NEW) for p in _PROMPTS]
  # Stop at a token the first row produces mid-way, so stopping is tested
  # against transformers too (rows that never produce it run to the end).
  stop = want[0][4]
  want = [_hf_greedy(hf_model, p, _NEW, eos=stop) for p in _PROMPTS]
  got = generate.generate(cfg, variables, _PROMPTS, max_new_tokens=_NEW,
                          stop_ids=[stop])
  assert [c.tokens for c in got] == want
  for c, w in zip(got, want):
    assert c.stopped == (w[-1] == stop and stop in w)
    assert c.content_tokens == (w[:-1] if c.stopped else w)


def test_batching_does_not_change_a_row(tiny_models):
  cfg, variables, _ = tiny_models("gemma2")
  prompts = list(_PROMPTS) + [[7, 7, 7, 7, 7]]
  batched = generate.generate(cfg, variables, prompts, max_new_tokens=_NEW,
                              batch_size=4)
  alone = [generate.generate(cfg, variables, [p], max_new_tokens=_NEW)[0]
           for p in prompts]
  assert [c.tokens for c in batched] == [c.tokens for c in alone]
  # Batches of 3 (padded to 4 rows) and then 1: the same again.
  split = generate.generate(cfg, variables, prompts, max_new_tokens=_NEW,
                            batch_size=3)
  assert [c.tokens for c in split] == [c.tokens for c in alone]


def test_same_bucket_compiles_once(tiny_models):
  cfg, variables, _ = tiny_models("llama")
  generate.generate(cfg, variables, [[1, 2, 3], [4, 5], [6]],
                    max_new_tokens=_NEW)
  before = generate.trace_count
  # Other lengths (<= 16) and batch sizes (3 or 4 rows): the same shapes.
  generate.generate(cfg, variables, [[9] * 15, [3] * 7, [1] * 16],
                    max_new_tokens=_NEW)
  generate.generate(cfg, variables, [[8] * 11, [1], [2, 3], [4] * 9],
                    max_new_tokens=_NEW)
  assert generate.trace_count == before
  # A longer prompt is a new bucket: exactly one more compilation.
  generate.generate(cfg, variables, [[8] * 17, [1], [2]], max_new_tokens=_NEW)
  generate.generate(cfg, variables, [[8] * 30, [1], [2, 2]],
                    max_new_tokens=_NEW)
  assert generate.trace_count == before + 1


def test_sampling_is_seeded(tiny_models):
  cfg, variables, _ = tiny_models("llama")
  s = sampling.Sampling(temperature=1.5)
  a = generate.generate(cfg, variables, _PROMPTS, max_new_tokens=_NEW,
                        sampling=s, seed=1)
  b = generate.generate(cfg, variables, _PROMPTS, max_new_tokens=_NEW,
                        sampling=s, seed=1)
  c = generate.generate(cfg, variables, _PROMPTS, max_new_tokens=_NEW,
                        sampling=s, seed=2)
  assert [x.tokens for x in a] == [x.tokens for x in b]
  assert [x.tokens for x in a] != [x.tokens for x in c]


def test_bad_requests_raise(tiny_models):
  cfg, variables, _ = tiny_models("llama")
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate.generate(cfg, variables, [[1], []], max_new_tokens=_NEW)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.generate(cfg, variables, [[1]], max_new_tokens=0)


def test_bucket():
  assert [generate.bucket(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]
  assert [generate.bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
  assert np.all(np.diff([generate.bucket(n) for n in range(1, 100)]) >= 0)
