"""`sft-jax score` against log-probabilities computed with transformers."""

import json

import numpy as np
import pytest
import torch

import tiny_hf
import tiny_tok
from sft_jax import cli

PROMPTS = [
    ("Hello, how are you", " today? I am fine."),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("What is two plus two?", " It is four."),
    ("Answer with a JSON object:", ' {"count": 3}'),
    ("Packing", " several short examples into one row saves compute."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("score_model")
  tok = tiny_tok.make_tokenizer(path)
  tiny_hf.make_tiny_hf("qwen2", path, vocab_size=len(tok))
  return path


def _reference_logprob(hf_model, tok, prompt, completion):
  p_ids = tok(prompt)["input_ids"]
  c_ids = tok(completion, add_special_tokens=False)["input_ids"]
  ids = torch.tensor([p_ids + c_ids])
  with torch.no_grad():
    logp = torch.log_softmax(hf_model(ids).logits.double(), -1)[0]
  total = sum(float(logp[len(p_ids) - 1 + j, c]) for j, c in enumerate(c_ids))
  return total, len(c_ids)


def _run(tmp_path, model_dir, lines, *extra):
  data = tmp_path / "in.jsonl"
  data.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  rc = cli.main(["score", "--model", str(model_dir), "--data", str(data),
                 "--out", str(out), *extra])
  return rc, out


def test_score_matches_transformers(tmp_path, model_dir):
  lines = [json.dumps({"prompt": p, "completion": c}) for p, c in PROMPTS]
  # Batch size 2 forces several packed rows and several forward passes.
  rc, out = _run(tmp_path, model_dir, lines, "--batch-size", "2")
  assert rc == 0
  results = [json.loads(l) for l in out.read_text().splitlines()]
  hf_model = tiny_hf.load_hf(model_dir)
  tok = tiny_tok.make_tokenizer()
  assert len(results) == len(PROMPTS)
  for (prompt, completion), got in zip(PROMPTS, results):
    want, n = _reference_logprob(hf_model, tok, prompt, completion)
    assert got["num_tokens"] == n
    np.testing.assert_allclose(got["logprob"], want, atol=1e-4, rtol=1e-5)


def test_candidates_are_ranked_by_logprob(tmp_path, model_dir):
  prompt = "What is two plus two?"
  candidates = [" It is four.", " The quick brown fox.", " four", " Hello"]
  rc, out = _run(tmp_path, model_dir,
                 [json.dumps({"prompt": prompt, "candidates": candidates})])
  assert rc == 0
  got = json.loads(out.read_text())
  hf_model = tiny_hf.load_hf(model_dir)
  tok = tiny_tok.make_tokenizer()
  want = [_reference_logprob(hf_model, tok, prompt, c)[0] for c in candidates]
  np.testing.assert_allclose(got["logprobs"], want, atol=1e-4, rtol=1e-5)
  assert got["ranking"] == list(np.argsort(-np.asarray(want)))


def test_bfloat16_is_close_to_float32(tmp_path, model_dir):
  lines = [json.dumps({"prompt": p, "completion": c}) for p, c in PROMPTS]
  _, out32 = _run(tmp_path, model_dir, lines)
  f32 = [json.loads(l)["logprob"] for l in out32.read_text().splitlines()]
  (tmp_path / "bf16").mkdir()
  _, out16 = _run(tmp_path / "bf16", model_dir, lines, "--dtype", "bfloat16")
  bf16 = [json.loads(l)["logprob"] for l in out16.read_text().splitlines()]
  np.testing.assert_allclose(bf16, f32, rtol=0.1, atol=1.0)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "hi", "completion": ', "not valid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"completion": "x"}', "'prompt' must be a string"),
    ('{"prompt": "hi"}', "expected exactly one of 'completion' or 'candidates'"),
    ('{"prompt": "hi", "candidates": []}', "non-empty list of strings"),
    ('{"prompt": "hi", "completion": 3}', "'completion' must be a string"),
])
def test_bad_line_names_file_and_line(tmp_path, model_dir, capsys, bad_line,
                                      message):
  good = json.dumps({"prompt": "a", "completion": "b"})
  rc, out = _run(tmp_path, model_dir, [good, good, bad_line])
  assert rc == 2
  err = capsys.readouterr().err
  assert "in.jsonl:3: " in err and message in err
  assert "Traceback" not in err
  assert not out.exists()


def test_chat_renders_the_prompt_as_a_user_turn(tmp_path, model_dir):
  lines = [json.dumps({"prompt": p, "completion": c}) for p, c in PROMPTS]
  rc, out = _run(tmp_path, model_dir, lines, "--chat")
  assert rc == 0
  results = [json.loads(l) for l in out.read_text().splitlines()]
  hf_model = tiny_hf.load_hf(model_dir)
  tok = tiny_tok.make_tokenizer()
  for (prompt, completion), got in zip(PROMPTS, results):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
      logp = torch.log_softmax(hf_model(ids).logits.double(), -1)[0]
    want = sum(float(logp[len(p_ids) - 1 + j, c])
               for j, c in enumerate(c_ids))
    np.testing.assert_allclose(got["logprob"], want, atol=1e-4, rtol=1e-5)


def test_a_run_directory_scores_as_its_merged_export(tmp_path):
  from sft_jax.infer import cli as infer_cli  # pylint: disable=g-import-not-at-top
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py:method=lora,steps=2", [
      f"--config.data.cache_dir={tmp_path / 'cache'}"])
  assert loop.train(cfg, str(tmp_path / "run"), progress=False).exit_code == 0
  assert infer_cli.export_main(["--run", str(tmp_path / "run"), "--out",
                                str(tmp_path / "hf"), "--merge"]) == 0
  lines = [json.dumps({"prompt": "What is 2 plus 3?",
                       "candidates": ["2 plus 3 is 5.", "STONE"]}),
           json.dumps({"prompt": "Say hello to Ada.",
                       "completion": "Hello, Ada!"})]
  got = {}
  for name, model in (("run", tmp_path / "run"), ("hf", tmp_path / "hf")):
    step = ["--step", "2"] if name == "run" else []
    rc, out = _run(tmp_path, model, lines, "--chat", *step)
    assert rc == 0
    got[name] = [json.loads(l) for l in out.read_text().splitlines()]
  np.testing.assert_allclose(got["run"][0]["logprobs"],
                             got["hf"][0]["logprobs"], rtol=1e-5)
  np.testing.assert_allclose(got["run"][1]["logprob"], got["hf"][1]["logprob"],
                             rtol=1e-5)
  assert got["run"][0]["ranking"] == got["hf"][0]["ranking"]
