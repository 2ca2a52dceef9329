"""The data doctor: statistics and problems of tokenized sources.

Counts, drops by reason, token-length percentiles, supervised fraction,
truncations, packing efficiency at a sequence length (the configured packer
run over one epoch), exact and near-duplicates within and across train/eval
(MinHash over token shingles, special tokens removed so the template's own
tokens do not make every pair look alike), and rendered examples with the
supervised tokens highlighted.
"""

import collections
import dataclasses
import hashlib

import numpy as np

from sft_jax.data import pipeline

_SHINGLE = 5  # tokens per shingle
_PERMS = 64  # MinHash permutations
_BANDS = 16  # LSH bands of _PERMS // _BANDS rows
_PRIME = (1 << 31) - 1  # a * x + b stays below 2**63


@dataclasses.dataclass
class SourceReport:
  name: str
  split: str  # "train" or "eval"
  kept: int
  truncated: int
  num_split: int  # long fully supervised examples split into rows
  drops: object  # DropLog
  length_pct: dict  # percentile -> tokens
  supervised_fraction: float
  packing_efficiency: float


def _percentiles(lengths):
  if not len(lengths):
    return {}
  return {p: int(np.percentile(lengths, p)) for p in (50, 90, 99, 100)}


def packing_efficiency(p: pipeline.PreparedSource, data_cfg, tok, seq_len):
  """Non-padding tokens over all tokens after packing one epoch."""
  if not len(p.keep):
    return 0.0
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(p.rows).map(pipeline.example_loader(
      p, 0, seq_len, data_cfg.too_long, tok.bos_token_id))
  real = total = 0
  for row in pipeline.pack(ds.to_iter_dataset(), data_cfg, seq_len, 0,
                           shuffle_bins=False):
    real += int((row["segment_ids"] > 0).sum())
    total += row["segment_ids"].size
  return real / total


def source_report(name, split, p, data_cfg, tok, seq_len) -> SourceReport:
  lengths = p.tokenized.lengths[p.keep] if len(p.keep) else np.zeros(0)
  sup = tot = 0
  for i in p.keep:
    _, m = p.tokenized.example(int(i))
    sup += int(m[1:].sum())
    tot += len(m) - 1
  return SourceReport(name, split, len(p.keep), p.truncated, p.split, p.drops,
                      _percentiles(lengths), sup / max(tot, 1),
                      packing_efficiency(p, data_cfg, tok, seq_len))


def _signature(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """MinHash signature [_PERMS] of the token-shingle set."""
  if len(ids) < _SHINGLE:
    shingles = [hash(tuple(ids.tolist()))]
  else:
    view = np.lib.stride_tricks.sliding_window_view(ids, _SHINGLE)
    shingles = [hash(tuple(r)) for r in view.tolist()]
  x = np.unique(np.asarray(shingles, np.int64).astype(np.uint64) % _PRIME)
  h = (np.outer(a, x) + b[:, None]) % _PRIME
  return h.min(axis=1)


@dataclasses.dataclass
class Duplicates:
  exact: dict  # (split_a, split_b) -> count of duplicate pairs
  near: dict  # (split_a, split_b) -> count of near-duplicate pairs
  examples: list  # up to a few (kind, where_a, where_b)


def find_duplicates(prepared: list, tok, threshold: float = 0.8,
                    keep_examples: int = 5) -> Duplicates:
  """Exact and near-duplicate pairs across `prepared` = [(split, Prepared)].

  A pair counts once; near-duplicates exclude exact ones. Near means the
  MinHash estimate of the token-shingle Jaccard similarity >= threshold.
  """
  rng = np.random.default_rng(0)
  a = rng.integers(1, _PRIME, _PERMS).astype(np.uint64)
  b = rng.integers(0, _PRIME, _PERMS).astype(np.uint64)
  specials = np.asarray(sorted(set(tok.all_special_ids)), np.int64)
  items = []  # (split, where, digest, signature)
  for split, p in prepared:
    for i in p.keep:
      ids, _ = p.tokenized.example(int(i))
      content = ids[~np.isin(ids, specials)]
      items.append((split, p.tokenized.where(int(i)),
                    hashlib.sha1(ids.tobytes()).digest(),
                    _signature(content, a, b)))
  exact, near = collections.Counter(), collections.Counter()
  examples = []

  def key(s1, s2):
    return tuple(sorted((s1, s2)))

  by_digest = collections.defaultdict(list)
  for k, it in enumerate(items):
    by_digest[it[2]].append(k)
  exact_pairs = set()
  for group in by_digest.values():
    for x in range(len(group)):
      for y in range(x + 1, len(group)):
        i, j = group[x], group[y]
        exact_pairs.add((i, j))
        exact[key(items[i][0], items[j][0])] += 1
        if len(examples) < keep_examples:
          examples.append(("exact", items[i][1], items[j][1]))
  rows = _PERMS // _BANDS
  buckets = collections.defaultdict(list)
  for k, it in enumerate(items):
    for band in range(_BANDS):
      buckets[(band, it[3][band * rows:(band + 1) * rows].tobytes())].append(k)
  candidates = set()
  for group in buckets.values():
    for x in range(len(group)):
      for y in range(x + 1, len(group)):
        candidates.add((group[x], group[y]))
  for i, j in sorted(candidates - exact_pairs):
    if np.mean(items[i][3] == items[j][3]) >= threshold:
      near[key(items[i][0], items[j][0])] += 1
      if len(examples) < keep_examples:
        examples.append(("near", items[i][1], items[j][1]))
  return Duplicates(dict(exact), dict(near), examples)


def highlight(tok, ids, mask, color: bool) -> str:
  """Decoded example with supervised tokens marked (ANSI green or [[...]])."""
  on, off = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
  out, start = [], 0
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]).astype(int)))
  for s, e in zip(edges[::2], edges[1::2]):
    out.append(tok.decode(ids[start:s]))
    out.append(on + tok.decode(ids[s:e]) + off)
    start = e
  out.append(tok.decode(ids[start:]))
  return "".join(out)
