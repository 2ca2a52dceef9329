"""`sft-jax data dump` and `sft-jax data inspect` on real files."""

import json
import re

import numpy as np
import pytest

import tiny_tok
from sft_jax import cli
from sft_jax.data import render
from sft_jax.data.formats import Example

CHATS = [
    [{"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "It is four."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Hello, how are you today?"},
     {"role": "assistant", "content": "I am fine, thank you."},
     {"role": "user", "content": "The quick brown fox?"},
     {"role": "assistant", "content": "Jumps over the lazy dog."}],
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  tok = tiny_tok.make_tokenizer(d / "tok", chat_template=tiny_tok.LLAMA3)
  lines = [json.dumps({"messages": m}) for m in CHATS]
  lines.insert(1, '{"messages": [')  # line 2: malformed
  lines.append(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
  lines.append(lines[0])  # line 5: exact duplicate of line 1
  (d / "train.jsonl").write_text("\n".join(lines) + "\n")
  # Eval holds a copy of a training example and a near-duplicate of another.
  near = json.loads(json.dumps(CHATS[1]))
  near[4]["content"] = "Jumps over the lazy cat."
  (d / "eval.jsonl").write_text(json.dumps({"messages": CHATS[0]}) + "\n" +
                                json.dumps({"messages": near}) + "\n")
  return d, tok


def test_dump_writes_the_training_tokens_and_masks(files, capsys):
  d, tok = files
  out = d / "dump.jsonl"
  rc = cli.main(["data", "dump", "--tokenizer", str(d / "tok"), "--data",
                 str(d / "train.jsonl"), "--out", str(out)])
  assert rc == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 3
  enc = render.Encoder(tok, tok.chat_template, "assistant")
  for row, chat in zip(rows, [CHATS[0], CHATS[1], CHATS[0]]):
    ids, mask = enc.encode(Example("chat", messages=chat))
    assert row["input_ids"] == ids.tolist()
    assert row["loss_mask"] == mask.tolist()
    sup = np.asarray(row["input_ids"])[np.asarray(row["loss_mask"]) > 0]
    want = "".join(m["content"] + "<|eot_id|>" for m in chat
                   if m["role"] == "assistant")
    assert tok.decode(sup) == want
  text = capsys.readouterr().out
  assert "wrote 3 examples" in text
  assert "dropped: 2" in text
  assert f"malformed_json: 1  (e.g. {d}/train.jsonl:2" in text
  assert f"no_assistant_turn: 1  (e.g. {d}/train.jsonl:4" in text


def test_dump_strict_and_mask_last_and_max_length(files, capsys):
  d, tok = files
  rc = cli.main(["data", "dump", "--tokenizer", str(d / "tok"), "--data",
                 str(d / "train.jsonl"), "--out", str(d / "x.jsonl"),
                 "--strict"])
  assert rc == 2
  assert (f"sft-jax data: data: {d}/train.jsonl:2: malformed_json"
          in capsys.readouterr().err)
  rc = cli.main(["data", "dump", "--tokenizer", str(d / "tok"), "--data",
                 str(d / "train.jsonl"), "--out", str(d / "x.jsonl"),
                 "--mask", "last", "--max-length", "60"])
  assert rc == 0
  rows = [json.loads(l) for l in (d / "x.jsonl").read_text().splitlines()]
  assert [len(r["input_ids"]) for r in rows] == [38, 60, 38]
  sup = [tok.decode(np.asarray(r["input_ids"])[np.asarray(r["loss_mask"]) > 0])
         for r in rows]
  assert sup[1] == "Jumps over the lazy dog.<|eot_id|>"
  assert rows[1]["input_ids"][0] == tok.bos_token_id  # BOS kept when cut
  assert "1 truncated" in capsys.readouterr().out


def test_inspect_on_files(files, capsys):
  d, _ = files
  rc = cli.main(["data", "inspect", "--tokenizer", str(d / "tok"), "--data",
                 str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl"),
                 "--seq-len", "256", "--packing", "pad", "--examples", "1",
                 "--cache-dir", str(d / "cache"), "--color", "never"])
  assert rc == 0
  out = capsys.readouterr().out
  assert ("records: 3 kept, 2 dropped; examples: 3 kept, 0 truncated, 0 "
          "split into rows") in out
  assert "masks: 3 prefix-stable\n" in out
  assert "malformed_json: 1\n" in out and "no_assistant_turn: 1\n" in out
  assert f"      {d}/train.jsonl:4: the conversation has no reply" in out
  # Token-length percentiles and the supervised fraction of the train set,
  # recomputed here from the dump contract.
  tok = tiny_tok.make_tokenizer(chat_template=tiny_tok.LLAMA3)
  enc = render.Encoder(tok, tok.chat_template, "assistant")
  encoded = [enc.encode(Example("chat", messages=c))
             for c in (CHATS[0], CHATS[1], CHATS[0])]
  lengths = [len(i) for i, _ in encoded]
  assert f"p50={int(np.percentile(lengths, 50))}" in out
  assert f"p100={max(lengths)}" in out
  frac = sum(m[1:].sum() for _, m in encoded) / sum(len(m) - 1
                                                    for _, m in encoded)
  assert f"supervised-token fraction: {frac:.3f}" in out
  # Padding mode: each example alone in a 256-token row.
  eff = sum(n - 1 for n in lengths) / (256 * len(lengths))
  assert f"packing efficiency at 256: {eff:.3f}" in out
  # Duplicates: train line 5 == line 1 (train/train), eval line 1 == train
  # lines 1 and 5 (eval/train: 2 pairs), eval line 2 ~ train line 3 (near).
  assert re.search(r"exact: eval/train: 2, train/train: 1", out)
  assert re.search(r"near \(>= 0.8\): eval/train: 1\b", out)
  assert "[[It is four.<|eot_id|>]]" in out


def test_inspect_on_a_run_config(files, tmp_path, capsys):
  d, _ = files
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f'''
import ml_collections
from sft_jax.data import config as data_config

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(path={str(d / "tok")!r}))
  c.train = ml_collections.ConfigDict(dict(seq_len=128))
  c.data = data_config.default_config()
  c.data.cache_dir = {str(tmp_path / "cache")!r}
  c.data.sources.chat = data_config.source_config(
      path={str(d / "train.jsonl")!r}, mask="last")
  return c
''')
  rc = cli.main(["data", "inspect", "--config", str(cfg), "--examples", "0",
                 "--config.data.too_long=drop"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "seq_len: 128" in out and "too_long: drop" in out
  assert "== train source 'chat'" in out and "mask last" in out
  rc = cli.main(["data", "inspect", "--config", str(cfg),
                 "--config.data.nope=1"])
  assert rc == 2 and "nope" in capsys.readouterr().err


def test_inspect_on_a_run_directory(files, tmp_path, capsys):
  d, _ = files
  from sft_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = data_config.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.sources.chat = data_config.source_config(path=str(d / "train.jsonl"))
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(
      {"model": {"path": str(d / "tok")}, "train": {"seq_len": 96},
       "data": json.loads(c.to_json())}))
  assert cli.main(["data", "inspect", "--config", str(run), "--examples",
                   "0"]) == 0
  out = capsys.readouterr().out
  assert "seq_len: 96" in out and "examples: 3 kept" in out


def test_dump_splits_long_text_into_rows(files, tmp_path, capsys):
  d, _ = files
  tok = tiny_tok.make_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  (tmp_path / "t.jsonl").write_text(json.dumps(
      {"text": "the quick brown fox jumps over the lazy dog " * 4}) + "\n")
  out = tmp_path / "t_dump.jsonl"
  assert cli.main(["data", "dump", "--tokenizer", str(tmp_path / "tok"),
                   "--data", str(tmp_path / "t.jsonl"), "--out", str(out),
                   "--max-length", "10"]) == 0
  rows = [json.loads(l)["input_ids"] for l in out.read_text().splitlines()]
  full = tok("the quick brown fox jumps over the lazy dog " * 4)["input_ids"]
  full = full + [tok.eos_token_id]
  assert all(len(r) <= 10 for r in rows) and len(rows) > 3
  # Rows overlap by one token: their targets tile the document.
  assert sum((r[1:] for r in rows), []) == full[1:]
  assert "1 split into rows" in capsys.readouterr().out


def _qwen3(tmp_path):
  import real_templates  # pylint: disable=g-import-not-at-top
  tok = real_templates.tokenizer("Qwen/Qwen3-0.6B")
  tok.save_pretrained(str(tmp_path / "qwen3"))
  return tok, str(tmp_path / "qwen3")


def test_dump_and_inspect_report_split_conversations(tmp_path, capsys):
  tok, tok_dir = _qwen3(tmp_path)
  chats = [CHATS[1], CHATS[0]]  # multi-turn: Qwen3 rewrites its history
  data = tmp_path / "q.jsonl"
  data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
  out = tmp_path / "q_dump.jsonl"
  assert cli.main(["data", "dump", "--tokenizer", tok_dir, "--data",
                   str(data), "--out", str(out)]) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  sup = [tok.decode(np.asarray(r["input_ids"])[np.asarray(r["loss_mask"]) > 0])
         for r in rows]
  assert sup == ["<think>\n\n</think>\n\nJumps over the lazy dog.<|im_end|>",
                 "<think>\n\n</think>\n\nI am fine, thank you.<|im_end|>",
                 "<think>\n\n</think>\n\nIt is four.<|im_end|>"]
  text = capsys.readouterr().out
  assert "wrote 3 examples" in text
  assert "masks: 1 prefix-stable, 1 split per turn into 2 examples" in text
  # --history full keeps one sequence per conversation.
  assert cli.main(["data", "dump", "--tokenizer", tok_dir, "--data",
                   str(data), "--out", str(out), "--history", "full"]) == 0
  assert len(out.read_text().splitlines()) == 2
  assert "masks: 2 prefix-stable" in capsys.readouterr().out
  # Template kwargs: no thinking, so the prompt carries the empty think block
  # and the reply is the answer alone.
  assert cli.main(["data", "dump", "--tokenizer", tok_dir, "--data",
                   str(data), "--out", str(out), "--template-kwargs",
                   '{"enable_thinking": false}']) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert tok.decode(np.asarray(rows[-1]["input_ids"])[
      np.asarray(rows[-1]["loss_mask"]) > 0]) == "It is four.<|im_end|>"
  capsys.readouterr()
  assert cli.main(["data", "inspect", "--tokenizer", tok_dir, "--data",
                   str(data), "--examples", "0", "--seq-len", "128",
                   "--cache-dir", str(tmp_path / "cache")]) == 0
  text = capsys.readouterr().out
  assert "records: 2 kept, 0 dropped; examples: 3 kept" in text
  assert "masks: 1 prefix-stable, 1 split per turn into 2 examples" in text


def test_a_source_with_no_examples_is_an_error(files, tmp_path, capsys):
  d, _ = files
  data = tmp_path / "none.jsonl"
  data.write_text(json.dumps({"messages": [
      {"role": "user", "content": "x"}]}) + "\n{\n")
  out = tmp_path / "none_dump.jsonl"
  rc = cli.main(["data", "dump", "--tokenizer", str(d / "tok"), "--data",
                 str(data), "--out", str(out)])
  err = capsys.readouterr().err
  assert rc != 0 and not out.exists()
  assert (f"yields 0 examples: every record was dropped (no_assistant_turn: 1 "
          f"(e.g. {data}:1") in err and f"malformed_json: 1 (e.g. {data}:2" in err
  rc = cli.main(["data", "inspect", "--tokenizer", str(d / "tok"), "--data",
                 str(data), "--cache-dir", str(tmp_path / "cache")])
  assert rc != 0 and "source 'none'" in capsys.readouterr().err


def test_inspect_reports_generation_marker_disagreements(tmp_path, capsys):
  bad = tiny_tok.CHATML_GEN.replace(
      "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
      "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
  tiny_tok.make_tokenizer(tmp_path / "tok", chat_template=bad)
  data = tmp_path / "m.jsonl"
  data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
  assert cli.main(["data", "inspect", "--tokenizer", str(tmp_path / "tok"),
                   "--data", str(data), "--examples", "0",
                   "--cache-dir", str(tmp_path / "cache")]) == 0
  text = capsys.readouterr().out
  assert "generation markers checked on 2, disagree on 2" in text
  assert re.search(rf"first at {data}:1: token \d+ \('<\|im_end\|>'\): "
                   "generation markers say context, the rule says "
                   "supervised", text)
  assert cli.main(["data", "dump", "--tokenizer", str(tmp_path / "tok"),
                   "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                   "--strict"]) == 2
  assert f"{data}:1: the chat template's" in capsys.readouterr().err


def test_inspect_counts_reasoning_a_template_does_not_render(tmp_path, capsys):
  import real_templates  # pylint: disable=g-import-not-at-top
  tok = real_templates.tokenizer("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
  tok.save_pretrained(str(tmp_path / "r1"))
  data = tmp_path / "r.jsonl"
  data.write_text(json.dumps({"messages": [
      {"role": "user", "content": "Two plus two?"},
      {"role": "assistant", "content": "Four.",
       "reasoning_content": "Add them."}]}) + "\n")
  assert cli.main(["data", "inspect", "--tokenizer", str(tmp_path / "r1"),
                   "--data", str(data), "--examples", "0",
                   "--cache-dir", str(tmp_path / "cache")]) == 0
  text = capsys.readouterr().out
  assert "1 turns carry reasoning the template does not render" in text
  assert "masks: 0 prefix-stable, 1 split per turn into 1 examples" in text
