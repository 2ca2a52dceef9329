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


def test_ranking_metrics_from_labels(tmp_path, model_dir):
  candidates = [" It is four.", " The quick brown fox.", " four", " Hello",
                " one two", " six", " lazy dog"]
  hf_model = tiny_hf.load_hf(model_dir)
  tok = tiny_tok.make_tokenizer()
  lines, want_ranks = [], []
  for i, (prompt, _) in enumerate(PROMPTS):
    ref = [_reference_logprob(hf_model, tok, prompt, c)[0] for c in candidates]
    order = list(np.argsort(-np.asarray(ref), kind="stable"))
    # Right answers at different ranks: 1st, 2nd, 6th, and a pair (3rd, 7th).
    label = [[order[0]], [order[1]], [order[5]], [order[2], order[6]],
             [order[6]]][i]
    want_ranks.append(min(order.index(j) for j in label) + 1)
    label = [int(j) for j in label]
    lines.append(json.dumps({"prompt": prompt, "candidates": candidates,
                             "label": label if len(label) > 1 else label[0]}))
  lines.append(json.dumps({"prompt": "x", "completion": " y"}))  # unlabelled
  rc, out = _run(tmp_path, model_dir, lines, "--metrics",
                 str(tmp_path / "m.json"))
  assert rc == 0
  got = [json.loads(l) for l in out.read_text().splitlines()]
  assert [g["rank"] for g in got[:5]] == want_ranks == [1, 2, 6, 3, 7]
  metrics = json.loads((tmp_path / "m.json").read_text())
  ranks = np.asarray(want_ranks, float)
  assert metrics["n"] == 5
  np.testing.assert_allclose(metrics["top1"], np.mean(ranks <= 1))
  np.testing.assert_allclose(metrics["top5"], np.mean(ranks <= 5))
  np.testing.assert_allclose(metrics["mrr"], np.mean(1 / ranks))


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
    ('{"prompt": "hi", "candidates": ["a", "b"], "label": 2}',
     "'label' must be a candidate index in [0, 2)"),
    ('{"prompt": "hi", "candidates": ["a", "b"], "label": []}',
     "'label' must be a candidate index"),
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


def test_training_eval_ranking_equals_score(tmp_path, model_dir):
  import jax  # pylint: disable=g-import-not-at-top
  from sft_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  candidates = [" It is four.", " The quick brown fox.", " four", " Hello",
                " one two", " six"]
  lines = [json.dumps({"prompt": p, "candidates": candidates, "label": i})
           for i, (p, _) in enumerate(PROMPTS)]
  rc, _ = _run(tmp_path, model_dir, lines, "--metrics",
               str(tmp_path / "m.json"))
  assert rc == 0
  want = json.loads((tmp_path / "m.json").read_text())
  cfg = config_lib.get_config_from_file(f"configs/tiny.py:model={model_dir}")
  cfg.eval.ranking.rank = str(tmp_path / "in.jsonl")
  cfg.lock()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  sets = evaluate.load_ranking_sets(cfg, load_tokenizer(str(model_dir)))
  got = evaluate.ranking_eval(model_cfg, state, sets, batch_size=4)
  for key in ("top1", "top5", "mrr"):
    np.testing.assert_allclose(got[f"eval/rank/{key}"], want[key], rtol=1e-12)
  assert 0 < want["mrr"] < 1


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
