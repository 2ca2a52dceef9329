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


@dataclasses.dataclass
class RenderLog:
  """How a source's masks were derived (see sft_jax/data/turns.py).

  Conversations are prefix-stable (one example, every reply a span of the
  full rendering) or split (the template rewrote earlier turns, so those
  turns got their own examples); generation markers, where the template has
  them, are cross-checked against the rule.
  """
  records: int = 0  # records kept
  examples: int = 0  # examples they made
  chats: int = 0  # kept records rendered with the chat template
  split: int = 0  # chats split because the template rewrote history
  split_examples: int = 0  # examples made by split chats
  appended_eos: int = 0  # turns ended by an EOS the template never writes
  reasoning_lost: int = 0  # turns whose reasoning the template did not render
  markers_checked: int = 0  # chats whose generation markers were compared
  markers_disagree: int = 0  # ... and disagreed with the rule
  first_disagreement: str = ""  # "place: token k (...): both readings"

  def add(self, where: str, encoded, chat: bool) -> None:
    self.records += 1
    self.examples += len(encoded.examples)
    self.chats += int(chat)
    if encoded.split:
      self.split += 1
      self.split_examples += len(encoded.examples)
    self.appended_eos += encoded.appended_eos
    self.reasoning_lost += encoded.reasoning_lost
    if encoded.markers is not None:
      self.markers_checked += 1
      if encoded.markers:
        self.markers_disagree += 1
        if not self.first_disagreement:
          self.first_disagreement = f"{where}: {encoded.markers}"

  @property
  def method(self) -> str:
    """prefix-stable | split per turn | markers (agreeing with the rule)."""
    if not self.chats:
      return "no chat template (plain text / prompt+completion)"
    parts = [f"{self.chats - self.split} prefix-stable"]
    if self.split:
      parts.append(f"{self.split} split per turn into "
                   f"{self.split_examples} examples")
    if self.markers_checked:
      parts.append(f"generation markers checked on {self.markers_checked}, "
                   f"disagree on {self.markers_disagree}")
    return ", ".join(parts)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "RenderLog":
    return cls(**d)
