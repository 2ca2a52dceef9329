"""The Grain pipeline: packing, mixing, sharding, resuming, caching, eval."""

import json
import os

import numpy as np
import pytest

import tiny_tok
from sft_jax import data
from sft_jax.data import cache as cache_lib
from sft_jax.data import config as data_config
from sft_jax.data import workers as workers_lib


@pytest.fixture(scope="module")
def tok():
  return tiny_tok.make_tokenizer()


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _chats(tag, n):
  return [{"messages": [
      {"role": "user", "content": f"{tag} question {i}" + " why?" * (i % 4)},
      {"role": "assistant", "content": f"{tag} answer {i}" + " yes." * (i % 5)}]}
          for i in range(n)]


@pytest.fixture()
def cfg(tmp_path):
  c = data.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.sources.a = data.source_config(
      path=_write_jsonl(tmp_path / "a.jsonl", _chats("alpha", 40)), weight=0.8)
  c.sources.b = data.source_config(
      path=_write_jsonl(tmp_path / "b.jsonl", _chats("beta", 7)), weight=0.2)
  return c


def _cached_examples(c, tok, name):
  """Every shifted example of a source, as token tuples -> (targets, mask)."""
  src = cache_lib.tokenize_source(name, c.sources[name], tok,
                                  tok.chat_template, cache_dir=c.cache_dir)
  out = {}
  for i in range(len(src)):
    ids, mask = src.example(i)
    out[tuple(ids[:-1])] = (tuple(ids[1:]), tuple(mask[1:].astype(float)))
  return out


def _segments(batch):
  """Yields (row, segment id, slice) for every packed segment."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      where = np.flatnonzero(seg == s)
      yield r, s, slice(where[0], where[-1] + 1), where


def test_batches_follow_the_contract_and_segments_are_isolated(cfg, tok):
  cfg.max_segments_per_row = 3
  it = iter(data.make_train_pipeline(cfg, tok, seq_len=96, batch_size=4,
                                     seed=3))
  known = {**_cached_examples(cfg, tok, "a"), **_cached_examples(cfg, tok, "b")}
  names = data.source_names(cfg)
  assert names == ["a", "b"]
  seen = 0
  for _ in range(10):
    b = next(it)
    assert sorted(b) == sorted(data.BATCH_KEYS)
    for k, v in b.items():
      assert v.shape == (4, 96), k
      assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    pad = b["segment_ids"] == 0
    assert (b["loss_mask"][pad] == 0).all() and (b["tokens"][pad] == 0).all()
    # The model's attention rule, applied to the batch: every query sees
    # exactly its own example's tokens up to itself.
    seg, pos = b["segment_ids"], b["positions"]
    visible = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
               & (pos[:, None, :] <= pos[:, :, None]))
    for r in range(4):
      for t in np.flatnonzero(seg[r]):
        start = t - pos[r, t]
        assert np.flatnonzero(visible[r, t]).tolist() == list(
            range(start, t + 1))
    for row in b["segment_ids"]:
      ids = row[row > 0]
      # Contiguous segments numbered 1..S, at most max_segments_per_row.
      assert (np.diff(ids) >= 0).all() and ids.max() <= 3
      assert list(np.unique(ids)) == list(range(1, ids.max() + 1))
    for r, _, sl, where in _segments(b):
      assert len(where) == sl.stop - sl.start  # contiguous
      np.testing.assert_array_equal(b["positions"][r, sl],
                                    np.arange(len(where)))
      tokens = tuple(b["tokens"][r, sl])
      # Each segment is exactly one cached example, shifted before packing:
      # its targets never reach into the next segment.
      targets, mask = known[tokens]
      assert tuple(b["targets"][r, sl]) == targets
      assert tuple(b["loss_mask"][r, sl]) == mask
      assert len(set(b["source_id"][r, sl])) == 1
      seen += 1
  assert seen > 40


def test_mixing_follows_weights_with_oversampling(cfg, tok):
  # Source b has 7 examples and weight 0.2; a has 40 and weight 0.8: over 600
  # examples b is seen ~120 times, i.e. oversampled ~17 epochs.
  cfg.packing = "pad"
  it = iter(data.make_train_pipeline(cfg, tok, seq_len=96, batch_size=8,
                                     seed=0))
  counts = np.zeros(2)
  for _ in range(75):
    counts += np.bincount(next(it)["source_id"][:, 0], minlength=2)
  n = counts.sum()
  share = counts[1] / n
  assert abs(share - 0.2) < 3 * np.sqrt(0.2 * 0.8 / n), counts


def test_resume_from_saved_state_is_identical(cfg, tok):
  pipe = data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4, seed=1)
  it = iter(pipe)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # survives serialisation
  want = [next(it) for _ in range(6)]
  again = iter(data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4,
                                        seed=1))
  again.set_state(state)
  got = [next(again) for _ in range(6)]
  for w, g in zip(want, got):
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(w[k], g[k])
  # A different seed gives a different stream.
  other = next(iter(data.make_train_pipeline(cfg, tok, seq_len=64,
                                             batch_size=4, seed=2)))
  first = next(iter(pipe))
  assert not np.array_equal(other["tokens"], first["tokens"])


def test_processes_read_disjoint_shares(cfg, tok):
  cfg.packing = "pad"
  del cfg.sources["b"]
  epoch = {}
  for p in range(2):
    it = iter(data.make_train_pipeline(cfg, tok, seq_len=96, batch_size=4,
                                       process_index=p, process_count=2,
                                       seed=5))
    rows = []
    for _ in range(10):  # 10 batches of 2 rows = 20 = half of 40 examples
      b = next(it)
      assert b["tokens"].shape == (2, 96)
      rows += [tuple(r[r > 0]) for r in b["tokens"]]
    epoch[p] = set(rows)
  assert len(epoch[0]) == len(epoch[1]) == 20
  assert not epoch[0] & epoch[1]
  assert len(epoch[0] | epoch[1]) == len(_cached_examples(cfg, tok, "a"))


def test_cache_is_reused_across_weights_seed_and_length(cfg, tok, monkeypatch):
  data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=2)
  entries = sorted(os.listdir(cfg.cache_dir))
  assert len(entries) == 2

  def fail(*a, **k):
    raise AssertionError("re-tokenized")
  monkeypatch.setattr(cache_lib, "_build", fail)
  cfg.sources.a.weight = 0.1
  next(iter(data.make_train_pipeline(cfg, tok, seq_len=128, batch_size=4,
                                     seed=9)))
  monkeypatch.undo()
  cfg.sources.a.mask = "all"  # changes the tokens' masks: a new entry
  data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=2)
  assert len(os.listdir(cfg.cache_dir)) == 3


def test_too_long_examples_are_truncated_or_dropped(tmp_path, tok):
  long = [{"messages": [
      {"role": "user", "content": "the quick brown fox " * 10},
      {"role": "assistant", "content": "It is four."}]}]
  c = data.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.sources.s = data.source_config(path=_write_jsonl(tmp_path / "l.jsonl",
                                                     long * 3))
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=40)
  assert src.truncated == 3 and len(src.keep) == 3
  b = next(iter(data.make_train_pipeline(c, tok, seq_len=40, batch_size=1)))
  sup = b["targets"][0][b["loss_mask"][0] > 0]
  assert tok.decode(sup) == "It is four.<|im_end|>"
  assert b["segment_ids"][0].max() == 1  # one 40-token example fills the row
  c.too_long = "drop"
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=40)
  assert len(src.keep) == 0 and src.drops.counts["too_long"] == 3
  assert src.drops.examples["too_long"][0].startswith(
      str(tmp_path / "l.jsonl") + ":1")
  # The reply alone is longer than the row: dropped even when truncating.
  c.too_long = "truncate"
  src = data.prepare_source("s", c.sources.s, c, tok, seq_len=4)
  assert len(src.keep) == 0 and src.drops.counts["too_long"] == 3


def test_fit_length_keeps_bos_and_final_reply():
  ids = np.arange(1, 21)
  mask = np.zeros(20, np.uint8)
  mask[5:8] = 1  # an earlier reply
  mask[15:20] = 1  # the final reply
  out, m, status = data.fit_length(ids, mask, 10, "truncate", bos_id=1)
  assert status == "truncated"
  assert out.tolist() == [1] + list(range(12, 21))
  assert m.tolist() == [0] * 5 + [1] * 5
  out, m, status = data.fit_length(ids, mask, 5, "truncate", bos_id=1)
  assert status == "too_long"
  out, m, status = data.fit_length(ids, np.ones(20, np.uint8), 6, "truncate")
  assert status == "split" and out.tolist() == list(range(1, 7))
  assert data.split_starts(20, 6) == [0, 5, 10, 15]
  assert data.split_starts(21, 6) == [0, 5, 10, 15]  # last row: 6 tokens
  assert data.split_starts(22, 6) == [0, 5, 10, 15, 20]  # last row: 2


def test_eval_batches_cover_each_example_once(cfg, tok):
  cfg.eval_sources.held = cfg.sources.b
  out = data.make_eval_batches(cfg, tok, seq_len=128, batch_size=4)
  assert list(out) == ["held"]
  batches = out["held"]
  seen = [tuple(b["tokens"][r, sl]) for b in batches
          for r, _, sl, _ in _segments(b)]
  assert sorted(seen) == sorted(_cached_examples(cfg, tok, "b"))
  assert all(b["tokens"].shape == (4, 128) for b in batches)
  # Each process keeps its rows of the same global batches.
  halves = [data.make_eval_batches(cfg, tok, seq_len=128, batch_size=4,
                                   process_index=p, process_count=2)["held"]
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  for full, h0, h1 in zip(batches, *halves):
    np.testing.assert_array_equal(full["tokens"],
                                  np.concatenate([h0["tokens"], h1["tokens"]]))


def test_best_fit_packs_at_least_as_tightly(cfg, tok):
  def fill(mode):
    cfg.packing = mode
    it = iter(data.make_train_pipeline(cfg, tok, seq_len=128, batch_size=8,
                                       seed=0))
    return np.mean([(next(it)["segment_ids"] > 0).mean() for _ in range(8)])
  pad, first, best = fill("pad"), fill("first_fit"), fill("best_fit")
  assert pad < first <= best + 0.02


def test_worker_processes_build_the_same_cache(tmp_path, tok, monkeypatch):
  """Chunks encoded by workers and by the parent (while every worker is
  busy), reassembled in order: the cache files are byte-identical."""
  bad = ['{"messages": 3}', "{oops"]
  lines = [json.dumps(r) for r in _chats("gamma", 30)]
  lines[7:7] = bad
  path = tmp_path / "w.jsonl"
  path.write_text("\n".join(lines) + "\n")
  monkeypatch.setattr(cache_lib, "_CHUNK", 4)
  monkeypatch.setattr(cache_lib, "_INLINE_CHUNKS", 1)
  monkeypatch.setattr(workers_lib, "_QUEUED_PER_WORKER", 1)
  built = {}
  for workers in (1, 2):
    src = data.source_config(path=str(path))
    built[workers] = cache_lib.tokenize_source(
        "w", src, tok, tok.chat_template,
        cache_dir=str(tmp_path / f"cache{workers}"), workers=workers)
  one, two = built[1], built[2]
  for name in sorted(os.listdir(one.cache_path)):
    with open(os.path.join(one.cache_path, name), "rb") as f1, open(
        os.path.join(two.cache_path, name), "rb") as f2:
      assert f1.read() == f2.read(), name
  assert len(one) == 30
  assert dict(one.drops.counts) == {"missing_field": 1, "malformed_json": 1}


def test_tokenize_workers_follow_cpus_and_source_size(tmp_path):
  mb = 1 << 20
  assert workers_lib.auto_workers(1 * mb, cpus=8) == 1  # no pool
  assert workers_lib.auto_workers(13 * mb, cpus=2) == 1
  assert workers_lib.auto_workers(13 * mb, cpus=8) == 3
  assert workers_lib.auto_workers(1000 * mb, cpus=8) == 7
  assert workers_lib.auto_workers(None, cpus=8) == 7  # a hub dataset
  path = tmp_path / "s.jsonl"
  path.write_text("x" * (9 * mb))
  src = data.source_config(path=str(path))
  assert cache_lib.resolve_workers(0, src) == max(
      1, min(2, workers_lib.cpu_count() - 1))
  assert cache_lib.resolve_workers(3, src) == 3
  c = data.default_config()
  c.tokenize_workers = -1
  with pytest.raises(data.DataError, match="data.tokenize_workers=-1"):
    data_config.validate(c)


def test_each_epoch_is_a_fresh_permutation(tmp_path, tok):
  c = data.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.packing = "pad"
  c.sources.s = data.source_config(
      path=_write_jsonl(tmp_path / "s.jsonl", _chats("delta", 12)))
  it = iter(data.make_train_pipeline(c, tok, seq_len=96, batch_size=4, seed=4))
  rows = [tuple(r[r > 0]) for _ in range(6) for r in next(it)["tokens"]]
  first, second = rows[:12], rows[12:]
  assert len(set(first)) == 12 and set(first) == set(second)
  assert first != second
  # Without shuffling, file order, every epoch.
  c.shuffle = False
  it = iter(data.make_train_pipeline(c, tok, seq_len=96, batch_size=4))
  rows = [tuple(r[r > 0]) for _ in range(6) for r in next(it)["tokens"]]
  want = list(_cached_examples(c, tok, "s"))
  assert rows == want + want



def test_long_text_is_split_into_rows_covering_every_token(tmp_path, tok):
  words = "the quick brown fox jumps over the lazy dog " * 6
  c = data.default_config()
  c.cache_dir = str(tmp_path / "cache")
  c.packing = "pad"
  c.shuffle = False
  c.sources.t = data.source_config(path=_write_jsonl(
      tmp_path / "t.jsonl", [{"text": words}]))
  src = data.prepare_source("t", c.sources.t, c, tok, seq_len=16)
  ids, _ = src.tokenized.example(0)
  assert len(ids) > 40 and src.split == 1 and len(src.keep) == 1
  n_rows = len(data.split_starts(len(ids), 17))
  assert len(src.rows) == n_rows
  it = iter(data.make_train_pipeline(c, tok, seq_len=16, batch_size=n_rows))
  b = next(it)
  # Row by row, the targets are the document's tokens 1.. in order, each once.
  targets = np.concatenate([b["targets"][r][b["segment_ids"][r] > 0]
                            for r in range(n_rows)])
  np.testing.assert_array_equal(targets, ids[1:])
  assert (b["loss_mask"][b["segment_ids"] > 0] == 1).all()
  c.too_long = "drop"
  assert len(data.prepare_source("t", c.sources.t, c, tok, seq_len=16).keep) == 0


def test_rows_select_from_one_global_stream_with_one_state(cfg, tok):
  """A process keeps `rows` of the global batches; the iterator state is the
  global stream's, so a state saved with one row split resumes another."""
  full = iter(data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4,
                                       seed=3))
  part = iter(data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4,
                                       seed=3, rows=[1, 3]))
  for _ in range(3):
    f, p = next(full), next(part)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(p[k], f[k][[1, 3]])
  state = json.loads(json.dumps(part.get_state()))
  assert state == json.loads(json.dumps(full.get_state()))
  other = iter(data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4,
                                        seed=3, rows=[0]))
  other.set_state(state)
  np.testing.assert_array_equal(next(other)["tokens"],
                                next(full)["tokens"][[0]])
  with pytest.raises(data.DataError, match="not rows of a batch of 4"):
    data.make_train_pipeline(cfg, tok, seq_len=64, batch_size=4, rows=[4])


def _twice(items):
  return [2 * x for x in items]


def _no_worker_starts():
  raise RuntimeError("this worker cannot start")


def test_broken_worker_pool_falls_back_to_this_process(caplog):
  chunks = [[i, i + 1] for i in range(0, 20, 2)]
  got = list(workers_lib.ordered_map(
      _twice, chunks, workers=2, inline_first=1, init=_no_worker_starts,
      initargs=(), here=_twice))
  assert got == [_twice(c) for c in chunks]
  assert "tokenizer worker processes failed" in caplog.text
