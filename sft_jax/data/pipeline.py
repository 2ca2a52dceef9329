"""The Grain pipeline: cached sources -> shuffled, sharded, mixed, packed batches.

Per source: the indices of usable examples, shuffled by seed with a fresh
permutation every epoch, repeated forever. Sources are mixed by weight (a weight is a share of
the example stream; a small source is oversampled), each example is shifted
(inputs = ids[:-1], targets = ids[1:], mask = m[1:]) and then packed with
Grain's first-fit or best-fit packer into rows of exactly `seq_len` tokens
with at most `max_segments_per_row` examples, or padded one example a row.

Every process builds the same global stream of packed batches and keeps the
rows its devices hold (`rows`, from the mesh's batch sharding): replicas of a
batch shard get identical rows, and the iterator state is the same on every
process and independent of the process count and mesh, so a run resumes
exactly on another slice, packing and mixing included. The price is that each
host packs every row (host CPU, overlapped with the step by prefetching).

Every batch is a dict of numpy arrays [B_local, T]: tokens, targets (int32),
loss_mask (float32), segment_ids (int32, 0 = padding), positions (int32,
restarting at 0 per segment), source_id (int32, index into source_names).
"""

import dataclasses
import logging

import grain
import numpy as np

from sft_jax.data import cache
from sft_jax.data import config as config_lib
from sft_jax.data import render
from sft_jax.data import teacher_cache as teacher_cache_lib
from sft_jax.data.errors import DataError, DropLog

_LOG = logging.getLogger("sft_jax")

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions",
              "source_id")


def source_names(data_cfg) -> list:
  """Training source names; a name's index is its `source_id`."""
  return sorted(data_cfg.sources.keys())


def eval_source_names(data_cfg) -> list:
  """Eval set names; in eval batches `source_id` indexes this list."""
  return sorted(data_cfg.eval_sources.keys())


def fit_length(ids, mask, max_len: int, policy: str, bos_id=None):
  """Fits an example to `max_len` tokens (before shifting).

  Returns (ids, mask, status), status one of "ok", "truncated", "split",
  "too_long". "truncate" cuts the prompt from the left and keeps the final
  reply whole (and a leading BOS). When every token is supervised (raw text,
  mask "all") the example is "split" into rows (see split_starts) and the
  first row is returned. A reply that alone does not fit is "too_long" under
  either policy.
  """
  n = len(ids)
  if n <= max_len:
    return ids, mask, "ok"
  if policy == "drop":
    return ids, mask, "too_long"
  if mask.all():
    return ids[:max_len], mask[:max_len], "split"
  # Start of the last supervised run: the final reply.
  sup = np.flatnonzero(mask)
  breaks = np.flatnonzero(np.diff(sup) > 1)
  reply_start = int(sup[breaks[-1] + 1] if len(breaks) else sup[0])
  keep_bos = bos_id is not None and ids[0] == bos_id
  room = max_len - int(keep_bos)
  if n - reply_start > room:
    return ids, mask, "too_long"
  head = slice(0, 1) if keep_bos else slice(0, 0)
  return (np.concatenate([ids[head], ids[n - room:]]),
          np.concatenate([mask[head], mask[n - room:]]), "truncated")


def split_starts(n: int, max_len: int) -> list:
  """First tokens of the rows an n-token, fully supervised example is split
  into: rows of max_len tokens overlapping by one, so after the shift every
  token but the first is a target exactly once."""
  return list(range(0, n - 1, max_len - 1))


@dataclasses.dataclass
class PreparedSource:
  """A tokenized source with its examples fitted to one sequence length."""
  tokenized: cache.TokenizedSource
  keep: np.ndarray  # int64 [N]: indices of usable examples
  rows: np.ndarray  # int64 [R, 2]: (example index, first token) per row
  truncated: int  # examples whose prompt is cut from the left to fit
  split: int  # long fully supervised examples split into several rows
  drops: DropLog  # tokenize-time drops plus too_long / too_short


def prepare_source(name, src, data_cfg, tok, *, seq_len: int) -> PreparedSource:
  """Tokenizes (or loads from cache) one source and fits it to `seq_len`."""
  tokenized = cache.tokenize_source(
      name, src, tok, render.chat_template(data_cfg, tok),
      cache_dir=data_cfg.cache_dir, strict=data_cfg.strict,
      workers=data_cfg.tokenize_workers)
  drops = DropLog()
  drops.merge(tokenized.drops)
  lengths = tokenized.lengths
  max_len = seq_len + 1  # one token is lost to the shift
  fits = np.flatnonzero((lengths >= 2) & (lengths <= max_len))
  rows = [np.stack([fits, np.zeros_like(fits)], axis=1)]
  for i in np.flatnonzero(lengths < 2):
    drops.add("too_short", tokenized.where(i), "fewer than 2 tokens")
  truncated = split = 0
  for i in np.flatnonzero(lengths > max_len):
    ids, mask = tokenized.example(i)
    _, _, status = fit_length(ids, mask, max_len, data_cfg.too_long,
                              tok.bos_token_id)
    if status == "too_long":
      drops.add("too_long", tokenized.where(i),
                f"{lengths[i]} tokens, more than seq_len + 1 = {max_len}")
      continue
    starts = split_starts(len(ids), max_len) if status == "split" else [0]
    rows.append(np.asarray([(i, s) for s in starts], np.int64))
    truncated += status == "truncated"
    split += status == "split"
  if data_cfg.strict and drops.total:
    raise drops.first_error(f"source {name!r}")
  rows = np.concatenate(rows).astype(np.int64).reshape(-1, 2)
  rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]  # file order
  return PreparedSource(tokenized, np.unique(rows[:, 0]), rows, truncated,
                        split, drops)


def _prepare_all(data_cfg, tok, seq_len, group):
  config_lib.validate(data_cfg)
  names = sorted(data_cfg[group].keys())
  if not names:
    raise DataError(f"data.{group} is empty: declare at least one source")
  prepared = [prepare_source(n, data_cfg[group][n], data_cfg, tok,
                             seq_len=seq_len) for n in names]
  for n, p in zip(names, prepared):
    if not len(p.keep):
      continue  # An error naming the drops follows; no warning before it.
    # Drops are a warning, so they show even where logging is not set up.
    log = _LOG.warning if p.drops.total else _LOG.info
    log("data source %r: %d examples (%d truncated, %d split into rows); %s",
        n, len(p.keep), p.truncated, p.split,
        p.drops.summary().replace("\n", ";"))
  return names, prepared


def example_loader(p: PreparedSource, source_id, seq_len, policy, bos_id):
  """Row (example index, first token) -> shifted example dict of 1-D arrays."""
  def load(row):
    ids, mask = p.tokenized.example(int(row[0]))
    start = int(row[1])
    ids, mask, _ = fit_length(ids[start:], mask[start:], seq_len + 1, policy,
                              bos_id)
    n = len(ids) - 1
    return {"tokens": ids[:-1].astype(np.int32),
            "targets": ids[1:].astype(np.int32),
            "loss_mask": mask[1:].astype(np.float32),
            "source_id": np.full(n, source_id, np.int32)}
  return load


def _pad_row(seq_len):
  def pad(ex):
    n = len(ex["tokens"])
    out = {k: np.zeros(seq_len, v.dtype) for k, v in ex.items()}
    for k, v in ex.items():
      out[k][:n] = v
    out["segment_ids"] = np.zeros(seq_len, np.int32)
    out["segment_ids"][:n] = 1
    out["positions"] = np.zeros(seq_len, np.int32)
    out["positions"][:n] = np.arange(n, dtype=np.int32)
    return out
  return pad


def _rename_packed(row):
  out = {"tokens": row["tokens"], "targets": row["targets"],
         "loss_mask": row["loss_mask"],
         "segment_ids": row["tokens_segment_ids"].astype(np.int32),
         "positions": row["tokens_positions"].astype(np.int32),
         "source_id": row["source_id"]}
  if "teacher_index" in row:  # offline distillation (teacher_cache.py)
    out["teacher_index"] = row["teacher_index"]
  return out


def pack(ds: grain.IterDataset, data_cfg, seq_len, seed, *, shuffle_bins,
         extra_features=()):
  """Packs shifted examples into rows of exactly seq_len tokens."""
  if data_cfg.packing == "pad":
    return ds.map(_pad_row(seq_len))
  per_token = ("targets", "loss_mask", "source_id") + tuple(extra_features)
  packer = {"first_fit": grain.experimental.FirstFitPackIterDataset,
            "best_fit": grain.experimental.BestFitPackIterDataset}[
                data_cfg.packing]
  ds = packer(ds, length_struct={k: seq_len for k in ("tokens",) + per_token},
              num_packing_bins=data_cfg.packing_bins, seed=seed,
              shuffle_bins=shuffle_bins, meta_features=per_token,
              max_sequences_per_bin=data_cfg.max_segments_per_row or None)
  return ds.map(_rename_packed)


def local_rows(batch_size: int, process_index: int = 0,
               process_count: int = 1, rows=None) -> np.ndarray:
  """Rows of each global batch a process keeps: `rows` if given (from
  `train.sharding.process_rows`), else a contiguous 1/process_count block."""
  if rows is not None:
    rows = np.asarray(rows, np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= batch_size:
      raise DataError(f"rows {rows.tolist()} are not rows of a batch of "
                      f"{batch_size}")
    return rows
  if batch_size % process_count:
    raise DataError(f"batch_size {batch_size} is not divisible by "
                    f"process_count {process_count}")
  local = batch_size // process_count
  return np.arange(process_index * local, (process_index + 1) * local)


def _keep_rows(rows, batch_size):
  if len(rows) == batch_size:
    return lambda b: b
  return lambda b: {k: v[rows] for k, v in b.items()}


def make_train_pipeline(data_cfg, tok, *, seq_len: int, batch_size: int,
                        process_index: int = 0, process_count: int = 1,
                        seed: int = 0, teacher_cache: str = "", rows=None
                        ) -> grain.IterDataset:
  """The infinite training stream of this process's batches.

  Args:
    data_cfg: the `data` config (see config.default_config).
    tok: the tokenizer (a transformers fast tokenizer).
    seq_len: T, tokens per row.
    batch_size: the GLOBAL batch size; each process gets batch_size //
      process_count rows per batch.
    process_index, process_count: without `rows`, keep the process_index-th
      of process_count contiguous blocks of each global batch.
    seed: shuffling and packing seed.
    teacher_cache: an offline teacher directory (`sft-jax distill-cache`):
      batches then also hold teacher_ids (int32) and teacher_logp (float32)
      [B_local, T, K], the teacher's top-k at each position.
    rows: the rows of each global batch to keep (see local_rows).

  Returns:
    A grain IterDataset; `iter()` of it gives an iterator with get_state /
    set_state (the same on every process) whose batches are dicts of np
    arrays [len(rows), seq_len] with keys BATCH_KEYS.
  """
  rows = local_rows(batch_size, process_index, process_count, rows)
  names, prepared = _prepare_all(data_cfg, tok, seq_len, "sources")
  teacher = (teacher_cache_lib.TeacherCache(teacher_cache, names, prepared,
                                            seq_len) if teacher_cache else None)
  streams, weights = [], []
  for sid, (name, p) in enumerate(zip(names, prepared)):
    weight = float(data_cfg.sources[name].weight)
    if weight == 0:
      continue
    if not len(p.keep):
      raise DataError(f"data.sources.{name}: no usable example at "
                      f"seq_len={seq_len}; "
                      f"{p.drops.summary().replace(chr(10), ';')}")
    ds = grain.MapDataset.source(p.rows)
    if data_cfg.shuffle:
      # A distinct permutation per source and per epoch (Grain reseeds the
      # shuffle by epoch when indexing past the end).
      ds = ds.shuffle(seed=(seed * 1_000_003 + sid) % 2**32)
    ds = ds.repeat(None)
    load = example_loader(p, sid, seq_len, data_cfg.too_long,
                          tok.bos_token_id)
    ds = ds.map(teacher.add_index(load, sid) if teacher else load)
    streams.append(ds)
    weights.append(weight)
  if not streams:
    raise DataError("every data source has weight 0")
  mixed = grain.MapDataset.mix(streams, [w / sum(weights) for w in weights])
  ds = mixed.to_iter_dataset(grain.ReadOptions(
      num_threads=data_cfg.read_threads,
      prefetch_buffer_size=4 * data_cfg.read_threads))
  ds = pack(ds, data_cfg, seq_len, seed, shuffle_bins=True,
            extra_features=("teacher_index",) if teacher else ())
  ds = ds.batch(batch_size, drop_remainder=True).map(
      _keep_rows(rows, batch_size))
  if teacher:
    ds = ds.map(teacher.gather)
  if data_cfg.prefetch_batches:
    # Packing runs in Python; a thread overlaps it with the device's step.
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_cfg.prefetch_batches)
  return ds


def make_eval_batches(data_cfg, tok, *, seq_len: int, batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      rows=None) -> dict:
  """Finite, deterministic eval batches: {eval set name: [batch, ...]}.

  Each eval set is read once in file order and packed first-fit (no shuffle).
  Batches are built for the global `batch_size` (the last one padded with
  all-padding rows, segment_ids 0) and each process keeps its rows, so every
  process gets the same number of batches (rows: see local_rows).
  `source_id` indexes eval_source_names(data_cfg).
  """
  rows = local_rows(batch_size, process_index, process_count, rows)
  if not data_cfg.eval_sources:
    return {}
  names, prepared = _prepare_all(data_cfg, tok, seq_len, "eval_sources")
  out = {}
  for sid, (name, p) in enumerate(zip(names, prepared)):
    if not len(p.keep):
      raise DataError(f"data.eval_sources.{name}: no usable example at "
                      f"seq_len={seq_len}; "
                      f"{p.drops.summary().replace(chr(10), ';')}")
    ds = grain.MapDataset.source(p.rows).map(example_loader(
        p, sid, seq_len, data_cfg.too_long, tok.bos_token_id))
    packed = pack(ds.to_iter_dataset(), data_cfg, seq_len, 0,
                   shuffle_bins=False)
    batches = []
    for b in packed.batch(batch_size, drop_remainder=False):
      n = len(b["tokens"])
      if n < batch_size:
        b = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:],
                                            v.dtype)]) for k, v in b.items()}
      batches.append({k: v[rows] for k, v in b.items()})
    out[name] = batches
  return out
