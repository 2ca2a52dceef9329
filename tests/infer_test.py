"""The inference commands on a real (tiny) LoRA training run.

One `sft-jax train` run fine-tunes a tiny Qwen2 with LoRA; then
  * `sft-jax export --merge` gives a checkpoint transformers loads with the
    run's logits (not the base model's), tokenizer and chat template;
  * `sft-jax export --adapter` gives an adapter peft loads over the recorded
    base with the same logits;
  * `sft-jax generate` on the run directory and `sft-jax chat` on the
    export say what transformers' greedy `generate` says on the merged
    export, stopping at <|im_end|>;
  * `sft-jax eval` writes metrics to TensorBoard and samples to JSON.
"""

import json
import os

import numpy as np
import peft
import pytest
import torch
import transformers

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import tiny_hf
import tiny_tok
from sft_jax import models
from sft_jax.infer import cli
from sft_jax.infer import evaluate

_TOKENS = np.array([[3, 280, 262, 203, 292, 80, 4, 203, 3, 69]], np.int32)


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(run dir, base HF dir, load_run result) of a 2-step LoRA run."""
  from sft_jax.train import cli as train_cli  # pylint: disable=g-import-not-at-top
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("infer_run")
  base = tiny_hf.make_tiny_hf("qwen2", root / "base", vocab_size=320)
  tiny_tok.make_tokenizer(base)
  _write_jsonl(root / "train.jsonl", [
      {"messages": [{"role": "user", "content": f"say {i}"},
                    {"role": "assistant", "content": f"the number {i}"}]}
      for i in range(32)])
  workdir = str(root / "run")
  rc = train_cli.main([
      "--config", f"configs/tiny.py:model={base},data={root}/train.jsonl,"
      "method=lora,steps=2", "--workdir", workdir, "--no-progress",
      f"--config.data.cache_dir={root}/cache", "--config.optim.lr=0.05",
      "--config.optim.warmup_steps=0"])
  assert rc == 0
  return workdir, base, run_lib.load_run(workdir)


def _ours(r):
  t = _TOKENS.shape[1]
  return np.asarray(models.Transformer(r.model_cfg).apply(
      {"params": r.params, "lora": r.lora}, _TOKENS,
      np.arange(t, dtype=np.int32)[None], np.ones_like(_TOKENS)))


def _theirs(model):
  with torch.no_grad():
    return model(torch.from_numpy(_TOKENS).long()).logits.numpy()


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
  workdir, _, _ = run
  out = str(tmp_path_factory.mktemp("export") / "merged")
  assert cli.export_main(["--run", workdir, "--out", out, "--merge"]) == 0
  return out


def test_export_merge_is_the_trained_model(run, merged):
  _, base, r = run
  ours = _ours(r)
  theirs = _theirs(tiny_hf.load_hf(merged))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # Not the base model: training moved the logits well beyond tolerance.
  assert np.abs(theirs - _theirs(tiny_hf.load_hf(base))).max() > 1e-2
  # The tokenizer files are the run's, byte for byte (chat template too).
  for name, content in r.tokenizer_files.items():
    with open(os.path.join(merged, name), "rb") as f:
      assert f.read() == content, name
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  assert tok.chat_template == r.tokenizer.chat_template == tiny_tok.CHATML
  gen = transformers.GenerationConfig.from_pretrained(merged)
  assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id


@pytest.fixture(scope="module")
def adapter(run, tmp_path_factory):
  workdir, _, _ = run
  out = str(tmp_path_factory.mktemp("export") / "adapter")
  assert cli.export_main(["--run", workdir, "--out", out, "--adapter"]) == 0
  return out


def test_export_adapter_loads_in_peft_over_the_base(run, merged, adapter):
  _, base, _ = run
  out = adapter
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["base_model_name_or_path"] == base
  model = peft.AutoPeftModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  np.testing.assert_allclose(_theirs(model), _theirs(tiny_hf.load_hf(merged)),
                             atol=1e-4, rtol=0)


def _hf_reply(merged, prompt, max_new_tokens):
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  model = tiny_hf.load_hf(merged)
  text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                 add_generation_prompt=True, tokenize=False)
  ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
  out = model.generate(ids, attention_mask=torch.ones_like(ids),
                       do_sample=False, max_new_tokens=max_new_tokens)
  return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_and_chat_on_the_run_match_transformers(run, merged,
                                                          adapter, capsys):
  workdir, base, _ = run
  want = _hf_reply(merged, "say 3", 12)
  assert len(want) > 3  # a real reply, not an immediate end of turn
  assert cli.generate_main(["--model", workdir, "--prompt", "say 3",
                            "--max-new-tokens", "12"]) == 0
  assert capsys.readouterr().out == want + "\n"
  # The base model with the exported adapter put over it: the same again.
  assert cli.generate_main(["--model", base, "--adapter", adapter,
                            "--prompt", "say 3", "--max-new-tokens", "12"]
                           ) == 0
  assert capsys.readouterr().out == want + "\n"
  # chat on the merged export (a HF directory) gives the same reply.
  inputs, printed = iter(["say 3", "/exit"]), []
  assert cli.chat_main(["--model", merged, "--max-new-tokens", "12"],
                       input_fn=lambda _: next(inputs),
                       print_fn=printed.append) == 0
  assert printed == [f"assistant> {want}"]


def test_generate_from_a_file_and_raw(merged, tmp_path):
  data, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
  _write_jsonl(data, [
      {"prompt": "say 3"},
      {"messages": [{"role": "user", "content": "say 5"}]},
      {"messages": [{"role": "user", "content": "say 7"},
                    {"role": "assistant", "content": "dropped"}]}])
  assert cli.generate_main(["--model", merged, "--data", str(data),
                            "--out", str(out), "--max-new-tokens", "12"]) == 0
  with open(out) as f:
    got = [json.loads(line)["completion"] for line in f]
  assert got == [_hf_reply(merged, p, 12) for p in ("say 3", "say 5",
                                                     "say 7")]
  # --raw: plain text with the tokenizer's BOS, no template.
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  ids = torch.tensor([tok("the number").input_ids])
  assert ids[0, 0].item() == tok.bos_token_id
  want = tiny_hf.load_hf(merged).generate(
      ids, attention_mask=torch.ones_like(ids), do_sample=False,
      max_new_tokens=12)
  assert cli.generate_main(["--model", merged, "--prompt", "the number",
                            "--raw", "--max-new-tokens", "12",
                            "--out", str(out)]) == 0
  with open(out) as f:
    assert json.loads(f.readline())["completion"] == tok.decode(
        want[0, ids.shape[1]:], skip_special_tokens=True)


def test_eval_writes_tensorboard_and_samples(run, merged, tmp_path):
  workdir, _, r = run
  records = [
      {"messages": [{"role": "user", "content": "say 3"},
                    {"role": "assistant", "content": _hf_reply(merged,
                                                               "say 3", 8)}]},
      {"prompt": "say 5", "completion": "zebra"},
      {"instruction": "say 7", "output": "quokka"},
  ]
  data = tmp_path / "heldout.jsonl"
  _write_jsonl(data, records)
  assert cli.eval_main(["--run", workdir, "--data", str(data),
                        "--max-new-tokens", "8",
                        "--metrics", "exact_match,rouge_l,bleu"]) == 0
  path = os.path.join(workdir, "eval", f"gen_heldout_step_{r.step}.json")
  with open(path) as f:
    result = json.load(f)
  preds = [s["prediction"] for s in result["samples"]]
  assert preds[0] == records[0]["messages"][1]["content"]
  assert result["metrics"]["exact_match"] == pytest.approx(1 / 3)
  assert result["samples"][0]["rouge_l"] == 1.0
  want, _ = evaluate.score(
      preds, [records[0]["messages"][1]["content"], "zebra", "quokka"])
  for k, v in want.items():
    assert result["metrics"][k] == pytest.approx(v)
  # TensorBoard's own reader finds the same numbers.
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  acc.Reload()
  events = acc.Tensors("gen_heldout/exact_match")
  assert events[-1].step == r.step
  value = tensor_util.make_ndarray(events[-1].tensor_proto)
  assert float(value) == pytest.approx(1 / 3)
  # What the training loop calls: unmerged LoRA variables, same answers.
  metrics, samples = evaluate.generation_metrics(
      r.model_cfg, {"params": r.params, "lora": r.lora}, r.tokenizer,
      records, max_new_tokens=8, metrics=("exact_match",))
  assert [s["prediction"] for s in samples] == preds
  assert metrics["exact_match"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("main", [cli.generate_main, cli.chat_main,
                                  cli.eval_main, cli.export_main])
def test_help_texts(main, capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  assert "usage: sft-jax" in capsys.readouterr().out


def test_bad_eval_record_names_file_and_line(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                  '{"role": "assistant", "content": "yo"}]}\n\n'
                  '{"messages": [{"role": "user", "content": "no reply"}]}\n')
  with pytest.raises(ValueError, match=f"{data}:3: .*no_assistant_turn"):
    cli.eval_main(["--run", "unused-model", "--data", str(data),
                   "--out", str(tmp_path)])
