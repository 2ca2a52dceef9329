"""Examples -> (input_ids, loss_mask), with masks that do not trust templates.

A chat is rendered with its chat template, and each assistant turn is
supervised by one rule (turns.py): exactly what the model must generate at
inference for that turn, after the generation prompt, through its stop token.
A conversation whose template rewrites earlier turns becomes several examples,
each turn with the context it was generated from. A token is supervised when
it overlaps a supervised character span, so no template needs
`{% generation %}` markers; where a template has them, they are cross-checked
and a disagreement is reported (the rule is used).

The full rendering is tokenized without adding special tokens: the template
writes BOS itself when the model wants one, so a BOS is never doubled.
"""

import hashlib
import json
import os
import re

import dataclasses

import numpy as np

from sft_jax.data import turns as turns_lib
from sft_jax.data.errors import DataError, RecordError
from sft_jax.data.formats import Example

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_tokenizer(path_or_hub_id: str, chat_template: str | None = None):
  """Loads a (fast) tokenizer; `chat_template` (Jinja text or .jinja path)
  replaces the tokenizer's own, so saving the tokenizer saves the template used.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path_or_hub_id)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot load tokenizer {path_or_hub_id!r}: {e}") from e
  if chat_template:
    tok.chat_template = read_template(chat_template)
  return tok


def read_template(template: str) -> str:
  """A template given as Jinja text, or as a path to a file holding it."""
  if "{" not in template and os.path.isfile(os.path.expanduser(template)):
    with open(os.path.expanduser(template), encoding="utf-8") as f:
      return f.read()
  return template


def chat_template(data_cfg, tok) -> str | None:
  """The exact chat template the data is rendered with (None: no template)."""
  if data_cfg.chat_template:
    return read_template(data_cfg.chat_template)
  template = getattr(tok, "chat_template", None)
  if isinstance(template, dict):  # several named templates: use "default"
    template = template.get("default")
  return template or None


def tokenizer_fingerprint(tok) -> str:
  """Changes whenever the tokenizer would produce different ids."""
  h = hashlib.sha256(type(tok).__name__.encode())
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
  h.update(json.dumps(tok.special_tokens_map, sort_keys=True,
                      default=str).encode())
  return h.hexdigest()


def _overlap_mask(offsets, spans) -> np.ndarray:
  """1 for tokens whose character range overlaps any [start, end) span.

  A token's range is widened back to where the previous token ended:
  tokenizers that trim offsets (ByteLevel trim_offsets=True) report a lone
  space as zero-width, and it must still count as part of the reply.
  """
  mask = np.zeros(len(offsets), np.uint8)
  if not spans or not len(offsets):
    return mask
  starts = np.array([o[0] for o in offsets])
  ends = np.array([o[1] for o in offsets])
  prev_end = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])
  starts = np.minimum(starts, prev_end)
  ends = np.maximum(ends, starts + 1)
  for s, e in spans:
    mask |= ((starts < e) & (ends > s)).astype(np.uint8)
  return mask


@dataclasses.dataclass
class Encoded:
  """One record's examples and how their masks were derived."""
  examples: list  # [(input_ids int32 [L], loss_mask uint8 [L])]
  split: bool = False  # the history was rewritten: turns got own examples
  # Generation markers: None not checked, "" agree, else how they disagree.
  markers: str | None = None
  appended_eos: int = 0  # turns ended by an EOS the template never writes
  reasoning_lost: int = 0  # turns whose reasoning the template did not render


class Encoder:
  """Encodes canonical examples for one source (tokenizer, template, policy).

  `template_kwargs` go to the chat template (e.g. enable_thinking); `history`
  is "split" or "full" (see turns.py).
  """

  def __init__(self, tok, template: str | None, mask_policy: str,
               prompt_as_user_turn: bool = True,
               template_kwargs: dict | None = None, history: str = "split"):
    self.tok = tok
    self.template = template
    self.mask_policy = mask_policy
    self.prompt_as_user_turn = prompt_as_user_turn
    self.history = history
    self.template_kwargs = dict(template_kwargs or {})
    self.has_markers = bool(template and _GENERATION_TAG.search(template))
    self._specials = {k: v for k, v in tok.special_tokens_map.items()
                      if isinstance(v, str)}
    self._renderer = (turns_lib.Renderer(tok, template, self.template_kwargs)
                      if template else None)

  def _plan(self, ex: Example):
    """([(text, add_special_tokens, spans or None for all, add_eos)],
    record info: (split, appended EOS count, turns whose reasoning was not
    rendered, markers check or None))."""
    if ex.kind == "text":
      return [(ex.text, True, None, True)], (False, 0, 0, None)
    if ex.kind == "prompt_completion" and not (self.template and
                                               self.prompt_as_user_turn):
      text = ex.prompt + ex.completion
      return [(text, True, [(len(ex.prompt), len(text))], True)], (
          False, 0, 0, None)
    if not self.template:
      raise DataError("chat data needs a chat template, and the tokenizer has "
                      "none: set data.chat_template")
    messages = ex.messages
    if ex.kind == "prompt_completion":
      messages = ([{"role": "system", "content": ex.system}]
                  if ex.system else []) + [
                      {"role": "user", "content": ex.prompt},
                      {"role": "assistant", "content": ex.completion}]
    plan = self._renderer.plan(messages, self.mask_policy, self.history,
                               ex.tools)
    pieces = [(t, False, sp, False) for t, sp in zip(plan.texts, plan.spans)]
    check = None
    if (self.has_markers and self.mask_policy != "all" and
        plan.full_index is not None and plan.spans[plan.full_index]):
      # Markers are compared on the full rendering, over the turns that are
      # spans of it (split turns have texts the markers never marked).
      assistant = [i for i, m in enumerate(messages)
                   if m["role"] == "assistant"]
      kept = [assistant.index(t.index) for t in plan.turns
              if t.stable or self.history == "full"]
      check = (plan.full_index, messages, ex.tools, kept, len(assistant))
    appended = sum(t.appended_eos for t in plan.turns)
    lost = sum(t.reasoning_lost for t in plan.turns)
    return pieces, (plan.split, appended, lost, check)

  def _finish(self, piece, ids, offsets):
    _, _, spans, add_eos = piece
    ids = list(ids)
    mask = (np.ones(len(ids), np.uint8) if spans is None
            else _overlap_mask(offsets, spans))
    eos = self.tok.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
      ids.append(eos)  # the end of a completion or document is learned
      mask = np.append(mask, np.uint8(1))
    if self.mask_policy == "all":
      mask[:] = 1
    bos = self.tok.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
      raise DataError("double BOS: the rendered text starts with BOS and the "
                      "tokenizer adds another; fix the template or tokenizer")
    if not mask.any():
      raise RecordError("no_supervised_tokens",
                        "no token carries the loss under mask policy "
                        f"{self.mask_policy!r}")
    return np.asarray(ids, np.int32), mask

  def encode_batch(self, examples: list) -> list:
    """Encodes many examples with one batched tokenizer call.

    Returns, per example, an Encoded, the RecordError that rejects it, or the
    DataError (a template or tokenizer problem, which must stop the run) it
    raised, so the caller can name the record.
    """
    plans, out = [], [None] * len(examples)
    for k, ex in enumerate(examples):
      try:
        plans.append((k, self._plan(ex)))
      except (RecordError, DataError) as e:
        out[k] = e
    flat = [(k, j, piece) for k, (pieces, _) in plans
            for j, piece in enumerate(pieces)]
    done = {}
    for special in (True, False):
      group = [x for x in flat if x[2][1] == special]
      if not group:
        continue
      enc = self.tok([x[2][0] for x in group], add_special_tokens=special,
                     return_offsets_mapping=True)
      for (k, j, piece), ids, offsets in zip(group, enc["input_ids"],
                                             enc["offset_mapping"]):
        done[k, j] = (piece, ids, offsets)
    for k, (pieces, (split, appended, lost, check)) in plans:
      try:
        examples_k = [self._finish(*done[k, j]) for j in range(len(pieces))]
        markers = None
        if check is not None:
          j = check[0]
          markers = self._check_markers(*check[1:], done[k, j][1],
                                        done[k, j][2], examples_k[j][1])
        out[k] = Encoded(examples_k, split, markers, appended, lost)
      except (RecordError, DataError) as e:
        out[k] = e
    return out

  def encode_all(self, ex: Example) -> Encoded:
    (result,) = self.encode_batch([ex])
    if isinstance(result, Exception):
      raise result
    return result

  def encode(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """Returns (input_ids int32 [L], loss_mask uint8 [L]) before shifting, for
    a record that makes one example (see encode_all for split ones)."""
    result = self.encode_all(ex)
    if len(result.examples) != 1:
      raise ValueError(f"the record makes {len(result.examples)} examples "
                       "(its template rewrites history); use encode_all")
    return result.examples[0]

  def _marker_spans(self, messages, tools):
    from transformers.utils import chat_template_utils  # pylint: disable=g-import-not-at-top
    _, indices = chat_template_utils.render_jinja_template(
        [messages], tools=tools, chat_template=self.template,
        return_assistant_tokens_mask=True,
        **{**self._specials, **self.template_kwargs})
    return [tuple(s) for s in indices[0]]

  def _check_markers(self, messages, tools, kept, n_assistant, ids, offsets,
                     mask) -> str | None:
    """"" when the {% generation %} markers mark what the rule supervises
    (over the assistant turns `kept`, by position), else the first token
    where they differ, with both readings; None when the markers cannot be
    matched to turns (not one block per assistant turn)."""
    spans = self._marker_spans(messages, tools)
    if len(spans) != n_assistant:
      return None
    spans = [spans[j] for j in kept]
    ids = list(ids)
    marked = _overlap_mask(offsets, spans)
    n = len(marked)
    # Whitespace between the end-of-turn token and the next turn is template
    # layout; templates differ on whether it sits inside the markers.
    tokens = self.tok.convert_ids_to_tokens(ids)
    text = [self.tok.convert_tokens_to_string([t]) for t in tokens]
    differ = [k for k in np.flatnonzero(marked != mask[:n]) if text[k].strip()]
    if not differ:
      return ""
    k = differ[0]
    return (f"token {k} ({text[k]!r}): generation markers say "
            f"{'supervised' if marked[k] else 'context'}, the rule says "
            f"{'supervised' if mask[k] else 'context'} "
            f"({len(differ)} tokens differ)")
