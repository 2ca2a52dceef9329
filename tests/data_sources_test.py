"""Sources, formats and bad-input accounting."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_tok
from sft_jax import data
from sft_jax.data import cache as cache_lib
from sft_jax.data import formats
from sft_jax.data import sources

GOOD = {"messages": [{"role": "user", "content": "two plus two?"},
                     {"role": "assistant", "content": "four"}]}

BAD_LINES = [  # (line, expected reason or None for kept)
    (json.dumps(GOOD), None),
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed_json"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     "no_assistant_turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"},
                              {"role": "assistant", "content": "x"}]}),
     "unknown_role"),
    (json.dumps({"messages": [{"role": "user", "content": "  "},
                              {"role": "assistant", "content": "x"}]}),
     "empty_content"),
    (json.dumps({"messages": [{"role": "user", "content": 5},
                              {"role": "assistant", "content": "x"}]}),
     "non_string_content"),
    (json.dumps({"text": "hello"}), "missing_field"),
    ("", None),  # blank lines are skipped, not records
    (json.dumps({"messages": [{"role": "user", "content": "a"},
                              {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}),
     "template_error"),
    ("[1, 2]", "not_an_object"),
    (json.dumps({"messages": [{"role": "user"},
                              {"role": "assistant", "content": "x"}]}),
     "missing_field"),
    (json.dumps(GOOD), None),
]


@pytest.fixture(scope="module")
def mistral_tok():
  return tiny_tok.make_tokenizer(chat_template=tiny_tok.MISTRAL)


def _cfg(tmp_path, path, **kw):
  c = data.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.sources.s = data.source_config(path=str(path), **kw)
  return c


def test_malformed_corpus_counts_every_drop_with_file_and_line(tmp_path,
                                                              mistral_tok):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
  c = _cfg(tmp_path, path)
  src = data.prepare_source("s", c.sources.s, c, mistral_tok, seq_len=64)
  want = {}
  for lineno, (_, reason) in enumerate(BAD_LINES, start=1):
    if reason:
      want.setdefault(reason, []).append(f"{path}:{lineno}")
  assert dict(src.drops.counts) == {k: len(v) for k, v in want.items()}
  for reason, places in want.items():
    got = [e.split(": ")[0] for e in src.drops.examples[reason]]
    assert got == places, reason
  assert "alternate" in src.drops.examples["template_error"][0]
  assert "robot" in src.drops.examples["unknown_role"][0]
  assert [src.tokenized.where(i) for i in src.keep] == [f"{path}:1",
                                                        f"{path}:12"]
  # strict: the first bad record stops everything and is named.
  c.strict = True
  with pytest.raises(data.DataError, match=rf"{path}:2: malformed_json"):
    data.prepare_source("s", c.sources.s, c, mistral_tok, seq_len=64)


def test_strict_fails_on_a_cached_source_with_drops(tmp_path, mistral_tok):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(line for line, _ in BAD_LINES[:3]) + "\n")
  c = _cfg(tmp_path, path)
  data.prepare_source("s", c.sources.s, c, mistral_tok, seq_len=64)
  c.strict = True
  with pytest.raises(data.DataError, match=rf"{path}:2"):
    data.prepare_source("s", c.sources.s, c, mistral_tok, seq_len=64)


FORMAT_RECORDS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2",
               "output": "4", "system": "Be exact."},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be exact."},
                                   {"from": "human", "value": "Add 2 and 2."},
                                   {"from": "gpt", "value": "4"}]},
    "messages": {"messages": [{"role": "system", "content": "Be exact."},
                              {"role": "user", "content": "Add 2 and 2."},
                              {"role": "assistant", "content": "4"}]},
    "prompt_completion": {"prompt": "Add 2 and 2.", "completion": "4"},
    "text": {"text": "Two and two make four."},
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_RECORDS))
def test_formats_are_detected_and_converted(fmt):
  fields = data.source_config().fields
  record = FORMAT_RECORDS[fmt]
  assert formats.detect(record, fields) == fmt
  ex = formats.to_example(record, fmt, fields)
  if fmt == "alpaca":
    assert ex.messages == [{"role": "system", "content": "Be exact."},
                           {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                           {"role": "assistant", "content": "4"}]
  elif fmt in ("sharegpt", "messages"):
    assert ex.messages == FORMAT_RECORDS["messages"]["messages"]
  elif fmt == "prompt_completion":
    assert (ex.prompt, ex.completion) == ("Add 2 and 2.", "4")
  else:
    assert ex.text == "Two and two make four."


def test_field_mapping(tmp_path):
  tok = tiny_tok.make_tokenizer()
  path = tmp_path / "q.jsonl"
  path.write_text(json.dumps({"q": "two plus two?", "a": "four"}) + "\n")
  c = _cfg(tmp_path, path, format="prompt_completion")
  c.sources.s.fields.prompt = "q"
  c.sources.s.fields.completion = "a"
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
  ids, mask = src.tokenized.example(0)
  assert tok.decode(ids[mask > 0]) == "four<|im_end|>"


def test_parquet_csv_json_and_globs_read_alike(tmp_path):
  tok = tiny_tok.make_tokenizer()
  rows = [{"prompt": f"question {i}?", "completion": f"answer {i}"}
          for i in range(5)]
  (tmp_path / "d").mkdir()
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "p.parquet")
  with open(tmp_path / "d" / "c.csv", "w") as f:
    f.write("prompt,completion\n")
    f.writelines(f"{r['prompt']},{r['completion']}\n" for r in rows)
  (tmp_path / "d" / "j.json").write_text(json.dumps(rows))
  (tmp_path / "d" / "l.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  tokens = {}
  for name in ("p.parquet", "c.csv", "j.json", "l.jsonl"):
    c = _cfg(tmp_path, tmp_path / "d" / name)
    src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
    assert src.tokenized.fmt == "prompt_completion"
    tokens[name] = [tuple(src.tokenized.example(i)[0]) for i in src.keep]
  assert len({tuple(v) for v in tokens.values()}) == 1
  assert len(tokens["l.jsonl"]) == 5
  c = _cfg(tmp_path, tmp_path / "d" / "c.csv")
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
  assert src.tokenized.where(0) == f"{tmp_path}/d/c.csv:2"  # header is line 1
  # A glob and a comma list.
  c = _cfg(tmp_path, f"{tmp_path}/d/*.json*,{tmp_path}/d/p.parquet")
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
  assert len(src.keep) == 15


def test_paths_and_hub_ids_resolve():
  assert sources.resolve("HuggingFaceH4/no_robots") == ([],
                                                         "HuggingFaceH4/no_robots")
  with pytest.raises(data.DataError, match="no such file"):
    sources.resolve("/nonexistent/x.jsonl")
  with pytest.raises(data.DataError, match="format"):
    formats.detect({"foo": 1}, data.source_config().fields)


def test_raw_text_source_supervises_every_token(tmp_path):
  tok = tiny_tok.make_tokenizer()
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"text": "The quick brown fox."}) + "\n")
  c = _cfg(tmp_path, path)
  src = cache_lib.tokenize_source("s", c.sources.s, tok, tok.chat_template,
                                  cache_dir=c.cache_dir)
  ids, mask = src.example(0)
  assert tok.decode(ids) == "<s>The quick brown fox.</s>"
  assert mask.all()
  b = next(iter(data.make_train_pipeline(c, tok, seq_len=32, batch_size=1)))
  n = len(ids) - 1
  np.testing.assert_array_equal(b["tokens"][0, :n], ids[:-1])
  np.testing.assert_array_equal(b["targets"][0, :n], ids[1:])
  seg = b["segment_ids"][0]
  assert (seg[:n] == 1).all() and seg[n] != 1
  assert b["loss_mask"][0, :n].all() and not b["loss_mask"][0, seg == 0].any()


def test_hub_source_calls_datasets_with_its_settings(tmp_path, monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_load_dataset(path, **kw):
    calls.append((path, kw))
    return [{"prompt": "two plus two?", "completion": "four"}] * 2
  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  tok = tiny_tok.make_tokenizer()
  c = _cfg(tmp_path, "someorg/some_set", split="validation", subset="v2",
           revision="abc123")
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
  assert calls == [("someorg/some_set", dict(
      name="v2", split="validation", revision="abc123", streaming=True))]
  assert len(src.keep) == 2
  assert src.tokenized.where(1) == "someorg/some_set[validation]#1"


def test_template_problem_stops_the_run_naming_the_record(tmp_path):
  bad = tiny_tok.CHATML_GEN.replace(
      "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
      "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
  tok = tiny_tok.make_tokenizer(chat_template=bad)
  path = tmp_path / "m.jsonl"
  path.write_text("\n" + json.dumps(GOOD) + "\n")
  c = _cfg(tmp_path, path)
  # Markers that disagree with the mask rule are reported, and the rule wins;
  # strict stops the run at the record.
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
  assert len(src.keep) == 1 and src.tokenized.render.markers_disagree == 1
  assert src.tokenized.render.first_disagreement.startswith(
      f"{path}:2: token ")
  c.strict = True
  c.cache_dir = str(tmp_path / "cache_strict")
  with pytest.raises(data.DataError, match=rf"^{path}:2: .*disagree"):
    data.prepare_source("s", c.sources.s, c, tok, seq_len=64)
