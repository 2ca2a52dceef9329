"""Offline teacher top-k log-probs, aligned with the rows of tokenized sources.

`sft-jax distill-cache` runs the teacher once over every row the training
pipeline can draw (a source's fitted rows, see pipeline.prepare_source) and
writes, for each input position of the row, the teacher's K most likely next
tokens and their log-probs (temperature 1, full-vocabulary softmax):

  DIR/meta.json          top_k, vocab_size, seq_len, teacher, and per source
                         the tokenized cache entry it was computed from
  DIR/<source>/rows.npy    int64 [R, 2]: (example index, first token) per row
  DIR/<source>/offsets.npy int64 [R + 1]: row r is positions [o[r], o[r+1])
  DIR/<source>/ids.bin     int32 [N, K]
  DIR/<source>/logp.bin    float32 [N, K]

Alignment with packing, mixing and resume: every example the pipeline loads
carries a per-token `teacher_index` (1 + its position in the source's arrays;
0 = none), which Grain packs, pads and batches like `source_id`. The batch
then gathers `teacher_ids` / `teacher_logp` [B, T, K] by (source_id,
teacher_index) in a stateless map, so the iterator state (and so resume) is
exactly that of the pipeline without a teacher.
"""

import json
import os

import numpy as np

from sft_jax.data.errors import DataError

META = "meta.json"


def read_meta(cache_dir: str) -> dict:
  """The meta.json of a cache; OSError / ValueError when missing or bad."""
  path = os.path.join(os.path.expanduser(cache_dir), META)
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  for key in ("top_k", "vocab_size", "seq_len", "sources"):
    if key not in meta:
      raise ValueError(f"{path}: no {key!r}")
  return meta


class SourceWriter:
  """Appends rows of teacher top-k to DIR/<source>/."""

  def __init__(self, cache_dir: str, name: str, rows: np.ndarray):
    self._dir = os.path.join(cache_dir, name)
    os.makedirs(self._dir, exist_ok=True)
    np.save(os.path.join(self._dir, "rows.npy"), np.asarray(rows, np.int64))
    self._offsets = [0]
    self._ids = open(os.path.join(self._dir, "ids.bin"), "wb")
    self._logp = open(os.path.join(self._dir, "logp.bin"), "wb")

  def add(self, ids_NxK: np.ndarray, logp_NxK: np.ndarray) -> None:
    self._ids.write(np.ascontiguousarray(ids_NxK, np.int32).tobytes())
    self._logp.write(np.ascontiguousarray(logp_NxK, np.float32).tobytes())
    self._offsets.append(self._offsets[-1] + len(ids_NxK))

  def close(self) -> None:
    self._ids.close()
    self._logp.close()
    np.save(os.path.join(self._dir, "offsets.npy"),
            np.asarray(self._offsets, np.int64))


class _Source:
  def __init__(self, path: str, k: int):
    self.rows = np.load(os.path.join(path, "rows.npy"))
    self.offsets = np.load(os.path.join(path, "offsets.npy"))
    n = int(self.offsets[-1])
    self.ids = np.memmap(os.path.join(path, "ids.bin"), np.int32, "r",
                         shape=(n, k)) if n else np.zeros((0, k), np.int32)
    self.logp = np.memmap(os.path.join(path, "logp.bin"), np.float32, "r",
                          shape=(n, k)) if n else np.zeros((0, k), np.float32)
    # Rows are in (example, first token) order: one searchsorted finds one.
    self._keys = self.rows[:, 0] * (1 << 32) + self.rows[:, 1]

  def row_start(self, row) -> int:
    key = int(row[0]) * (1 << 32) + int(row[1])
    r = int(np.searchsorted(self._keys, key))
    return int(self.offsets[r])


class TeacherCache:
  """The cache of a run's training sources, opened for reading."""

  def __init__(self, cache_dir: str, names: list, prepared: list,
               seq_len: int):
    cache_dir = os.path.expanduser(cache_dir)
    try:
      meta = read_meta(cache_dir)
    except (OSError, ValueError) as e:
      raise DataError(f"distill.cache={cache_dir!r}: {e}") from None
    self.k = int(meta["top_k"])
    if meta["seq_len"] != seq_len:
      raise DataError(f"distill.cache={cache_dir!r} was built for seq_len "
                      f"{meta['seq_len']}, not {seq_len}")
    self.sources = []
    for name, p in zip(names, prepared):
      entry = meta["sources"].get(name)
      built_from = os.path.basename(p.tokenized.cache_path)
      if entry is None or entry["tokenized"] != built_from:
        raise DataError(
            f"distill.cache={cache_dir!r} has no teacher outputs for source "
            f"{name!r} as tokenized now ({built_from}); rebuild it with "
            "`sft-jax distill-cache`")
      src = _Source(os.path.join(cache_dir, name), self.k)
      if not np.array_equal(src.rows, p.rows):
        raise DataError(f"distill.cache={cache_dir!r}: source {name!r} rows "
                        "differ from the data's; rebuild the cache")
      self.sources.append(src)

  def add_index(self, load, sid: int):
    """Wraps an example loader: adds `teacher_index` [n] (1-based)."""
    src = self.sources[sid]

    def wrapped(row):
      ex = load(row)
      n = len(ex["tokens"])
      ex["teacher_index"] = (src.row_start(row) + 1
                             + np.arange(n, dtype=np.int64))
      return ex
    return wrapped

  def gather(self, batch: dict) -> dict:
    """Replaces `teacher_index` by teacher_ids / teacher_logp [B, T, K]."""
    batch = dict(batch)
    index = batch.pop("teacher_index")
    shape = index.shape + (self.k,)
    ids = np.zeros(shape, np.int32)
    logp = np.zeros(shape, np.float32)
    for sid, src in enumerate(self.sources):
      sel = (batch["source_id"] == sid) & (index > 0)
      if sel.any():
        ids[sel] = src.ids[index[sel] - 1]
        logp[sel] = src.logp[index[sel] - 1]
    batch["teacher_ids"], batch["teacher_logp"] = ids, logp
    return batch
