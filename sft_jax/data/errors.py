"""Bad-input accounting: every rejected record is counted by reason, with place.

`RecordError` rejects one record (it is caught, counted and the record
skipped); `DataError` stops the run with a message meant for a person (bad
configuration, a template that breaks the mask rules, or `strict` mode).
"""

import collections
import dataclasses

from sft_jax import errors


class DataError(errors.UserError):
  """A data problem that stops the run; the message names file, line, reason."""
  what = "data"


class RecordError(Exception):
  """One record is unusable. `reason` is a short stable key used for counts."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail

  def __reduce__(self):  # crosses process boundaries (tokenizer workers)
    return RecordError, (self.reason, self.detail)


@dataclasses.dataclass
class DropLog:
  """Counts of dropped (and truncated) records by reason, with examples.

  `where` strings are `file:line` for line-based files and `file#row` for
  row-based ones. Only the first `keep` places per reason are stored, so a
  badly broken corpus does not fill memory.
  """
  keep: int = 5
  counts: dict = dataclasses.field(
      default_factory=lambda: collections.Counter())
  examples: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))

  def add(self, reason: str, where: str, detail: str = "") -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < self.keep:
      self.examples[reason].append(f"{where}: {detail}" if detail else where)

  def first_error(self, context: str = "") -> DataError:
    """The error strict mode raises: the first stored place, and the totals."""
    reason = next(iter(self.examples))
    where, _, detail = self.examples[reason][0].partition(": ")
    return DataError(f"{where}: {reason}: {detail} ({self.total} bad records"
                     f"{' in ' + context if context else ''})")

  def merge(self, other: "DropLog") -> None:
    for reason, n in other.counts.items():
      self.counts[reason] += n
      room = self.keep - len(self.examples[reason])
      self.examples[reason].extend(other.examples.get(reason, [])[:room])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_json(self) -> dict:
    return {"counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()}}

  @classmethod
  def from_json(cls, d: dict) -> "DropLog":
    log = cls()
    log.counts.update(d.get("counts", {}))
    for k, v in d.get("examples", {}).items():
      log.examples[k] = list(v)
    return log

  def summary(self, title: str = "dropped", places: bool = False) -> str:
    """Console lines: the total, then one line per reason with its first
    place (or, with `places`, every stored place on its own line)."""
    if not self.counts:
      return f"{title}: 0"
    lines = [f"{title}: {self.total}"]
    for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
      stored = self.examples.get(reason) or []
      if places:
        lines.append(f"  {reason}: {n}")
        lines += [f"    {e}" for e in stored]
      else:
        lines.append(f"  {reason}: {n}" +
                     (f"  (e.g. {stored[0]})" if stored else ""))
    return "\n".join(lines)
