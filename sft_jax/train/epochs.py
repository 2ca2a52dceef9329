"""Training in epochs, and the examples and epochs seen per source.

An epoch of the mixture is as many examples as its sources hold together
(with weights proportional to the sources' sizes, every source is read once).
`train.epochs` turns into `train.steps` from the packed size of the mixture:
the training stream itself is packed for a few batches to measure examples
per row, so the count follows the packer, the sequence length and the mix.

During training the segments that start in each batch are counted by source:
`train/examples/<source>` (examples seen) and `train/epochs/<source>` (seen
over the source's size), plus `train/epoch` for the whole mixture.
"""

import dataclasses
import math

import numpy as np

from sft_jax import data

_MEASURE_BATCHES = 4  # batches packed to measure examples per row


@dataclasses.dataclass
class Plan:
  """Source sizes and the steps of `epochs` passes over the mixture."""
  sizes: dict[str, int]  # source name -> usable examples (rows)
  examples_per_row: float  # measured on the packed training stream
  steps: int  # optimizer steps of `epochs` epochs


def source_sizes(data_cfg, tok, seq_len: int) -> dict[str, int]:
  """Usable examples (rows after fitting to seq_len) of each weighted source."""
  out = {}
  for name in data.source_names(data_cfg):
    src = data_cfg.sources[name]
    if src.weight > 0:
      p = data.pipeline.prepare_source(name, src, data_cfg, tok,
                                       seq_len=seq_len)
      out[name] = len(p.rows)
  return out


def count_examples(batch: dict, names: list[str]) -> dict[str, int]:
  """Examples that start in a [B, T] batch, by source name."""
  starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  ids = batch["source_id"][starts]
  counts = np.bincount(ids, minlength=len(names))
  return {n: int(counts[i]) for i, n in enumerate(names)}


def plan(cfg, tok) -> Plan:
  """How many steps `cfg.train.epochs` epochs take (see module doc)."""
  seq_len, batch_size = cfg.train.seq_len, cfg.train.batch_size
  sizes = source_sizes(cfg.data, tok, seq_len)
  stream = iter(data.make_train_pipeline(cfg.data, tok, seq_len=seq_len,
                                         batch_size=batch_size,
                                         seed=cfg.seed))
  names = data.source_names(cfg.data)
  examples = 0
  for _ in range(_MEASURE_BATCHES):
    examples += sum(count_examples(next(stream), names).values())
  per_row = examples / (_MEASURE_BATCHES * batch_size)
  total = sum(sizes.values())
  steps = max(1, math.ceil(cfg.train.epochs * total / (per_row * batch_size)))
  return Plan(sizes=sizes, examples_per_row=per_row, steps=steps)


class Seen:
  """Running examples per source, kept in checkpoints for exact resume."""

  def __init__(self, names: list[str], sizes: dict[str, int],
               row_share: float = 1.0):
    """row_share: the fraction of each global batch's rows this process
    feeds (processes holding replicas feed the same rows)."""
    self._names, self._sizes = names, sizes
    # Each process counts its own rows and scales them to the global batch.
    self._scale = round(1.0 / row_share)  # shards split rows evenly
    self.counts = {n: 0 for n in names}

  def add(self, batch: dict) -> None:
    for n, c in count_examples(batch, self._names).items():
      self.counts[n] += c * self._scale

  def scalars(self) -> dict[str, float]:
    s = {}
    for n in self._names:
      if n in self._sizes:
        s[f"train/examples/{n}"] = float(self.counts[n])
        s[f"train/epochs/{n}"] = self.counts[n] / max(1, self._sizes[n])
    total = sum(self._sizes.values())
    if total:
      s["train/epoch"] = sum(self.counts.values()) / total
    return s

  def state_dict(self) -> dict:
    return dict(self.counts)

  def load_state_dict(self, d) -> None:
    self.counts.update({k: int(v) for k, v in (d or {}).items()})
