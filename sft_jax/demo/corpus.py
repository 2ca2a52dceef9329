"""The demo's general corpus: real human chat from the `chitchat-dataset` package.

chitchat-dataset (MIT licence, BYU PCC lab's Chit-Chat Challenge) ships 7,168
English conversations between people as JSON inside the wheel, so it installs
from PyPI with no other download. Each conversation becomes plain text, one
utterance group a line, speakers marked "A:" / "B:", cut into chunks of whole
lines short enough to fit a training row; the conversations are split into
train and held-out by a seeded shuffle.
"""

import random


def _conversations():
  try:
    import chitchat_dataset  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        "the demo's general corpus needs the chitchat-dataset package: "
        "pip install chitchat-dataset") from e
  return list(chitchat_dataset.Dataset().values())


def _chunks(conversation, max_chars: int):
  """Whole lines of one conversation, grouped into chunks <= max_chars."""
  speakers, lines = {}, []
  for message in conversation["messages"]:
    if not message:
      continue
    who = speakers.setdefault(message[0]["sender"], "AB"[len(speakers) % 2])
    text = " ".join(u["text"].strip() for u in message if u["text"].strip())
    if text:
      lines.append(f"{who}: {text}"[:max_chars])
  chunk = []
  for line in lines:
    if chunk and sum(len(l) + 1 for l in chunk) + len(line) > max_chars:
      yield "\n".join(chunk)
      chunk = []
    chunk.append(line)
  if chunk:
    yield "\n".join(chunk)


def make_splits(num_train: int, num_eval: int, *, max_chars: int,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(train, held-out) `{"text": ...}` records from disjoint conversations.

  num_train / num_eval count conversations; each yields one or more records.
  """
  conversations = _conversations()
  if num_train + num_eval > len(conversations):
    raise ValueError(f"asked for {num_train + num_eval} conversations; the "
                     f"corpus has {len(conversations)}")
  order = list(range(len(conversations)))
  random.Random(seed).shuffle(order)
  held_out_ids, train_ids = order[:num_eval], order[num_eval:][:num_train]

  def records(ids):
    return [{"text": c} for i in ids
            for c in _chunks(conversations[i], max_chars)]

  return records(train_ids), records(held_out_ids)
