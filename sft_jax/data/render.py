"""Examples -> (input_ids, loss_mask), with masks that do not trust templates.

A chat is rendered with its chat template. The reply of assistant turn i is
found by rendering the conversation prefix by prefix: with P = render(turns
[:i], add_generation_prompt=True) and F = render(turns[:i + 1]), the reply is
F[len(P):], which must also be a prefix of the full rendering. The supervised
characters run from where the reply's content starts to the end of that text
with trailing whitespace removed, i.e. the content plus the end-of-turn
token(s) the template closes the reply with. A token is supervised when it
overlaps a supervised span, so no template needs `{% generation %}` markers.
Where the template has them, both masks are computed and must agree.

The full rendering is tokenized without adding special tokens: the template
writes BOS itself when the model wants one, so a BOS is never doubled.
"""

import hashlib
import json
import os
import re

import numpy as np

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


class Encoder:
  """Encodes canonical examples for one source (tokenizer, template, policy)."""

  def __init__(self, tok, template: str | None, mask_policy: str,
               prompt_as_user_turn: bool = True):
    self.tok = tok
    self.template = template
    self.mask_policy = mask_policy
    self.prompt_as_user_turn = prompt_as_user_turn
    self.has_markers = bool(template and _GENERATION_TAG.search(template))
    self._specials = {k: v for k, v in tok.special_tokens_map.items()
                      if isinstance(v, str)}

  def _render(self, messages, add_generation_prompt: bool) -> str:
    try:
      return self.tok.apply_chat_template(
          messages, chat_template=self.template, tokenize=False,
          add_generation_prompt=add_generation_prompt)
    except Exception as e:  # pylint: disable=broad-except
      # Templates raise to refuse input (e.g. roles that do not alternate).
      raise RecordError("template_error", str(e).strip() or
                        type(e).__name__) from None

  def reply_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the supervised character span of each reply."""
    full = self._render(messages, False)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if self.mask_policy == "last":
      assistant = assistant[-1:]
    spans = []
    for i in assistant:
      prefix = self._render(messages[:i], True) if i else ""
      upto = full if i == len(messages) - 1 else self._render(
          messages[:i + 1], False)
      if not (upto.startswith(prefix) and full.startswith(upto)):
        # Some templates rewrite earlier turns depending on what follows
        # (e.g. dropping reasoning); no mask can be trusted for this record.
        raise RecordError(
            "template_not_prefix_stable",
            f"rendering turns [:{i}] with a generation prompt, then turn {i}, "
            "then the rest does not extend the text each time; give a "
            "prefix-stable template in data.chat_template")
      reply = upto[len(prefix):]
      content = messages[i]["content"]
      start = reply.find(content)
      if start < 0:
        start = max(reply.find(content.strip()), 0)
      end = len(reply.rstrip())
      spans.append((len(prefix) + start, len(prefix) + end))
    return full, spans

  def _marker_spans(self, messages):
    from transformers.utils import chat_template_utils  # pylint: disable=g-import-not-at-top
    _, indices = chat_template_utils.render_jinja_template(
        [messages], chat_template=self.template,
        return_assistant_tokens_mask=True, **self._specials)
    return [tuple(s) for s in indices[0]]

  def _plan(self, ex: Example):
    """(text, add_special_tokens, supervised spans or None for all, add_eos,
    messages to check against generation markers or None)."""
    if ex.kind == "text":
      return ex.text, True, None, True, None
    if ex.kind == "prompt_completion" and not (self.template and
                                               self.prompt_as_user_turn):
      text = ex.prompt + ex.completion
      return text, True, [(len(ex.prompt), len(text))], True, None
    if not self.template:
      raise DataError("chat data needs a chat template, and the tokenizer has "
                      "none: set data.chat_template")
    messages = ex.messages
    if ex.kind == "prompt_completion":
      messages = ([{"role": "system", "content": ex.system}]
                  if ex.system else []) + [
                      {"role": "user", "content": ex.prompt},
                      {"role": "assistant", "content": ex.completion}]
    full, spans = self.reply_spans(messages)
    check = messages if self.has_markers and self.mask_policy != "all" else None
    return full, False, spans, False, check

  def _finish(self, plan, ids, offsets):
    _, _, spans, add_eos, check = plan
    ids = list(ids)
    mask = (np.ones(len(ids), np.uint8) if spans is None
            else _overlap_mask(offsets, spans))
    if check is not None:
      self._check_markers(check, ids, offsets, mask)
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
    """encode() over many examples with one batched tokenizer call.

    Returns, per example, (input_ids, loss_mask), the RecordError that
    rejects it, or the DataError (a template or tokenizer problem, which must
    stop the run) it raised, so the caller can name the record.
    """
    plans, out = [], [None] * len(examples)
    for k, ex in enumerate(examples):
      try:
        plans.append((k, self._plan(ex)))
      except (RecordError, DataError) as e:
        out[k] = e
    for special in (True, False):
      group = [(k, p) for k, p in plans if p[1] == special]
      if not group:
        continue
      enc = self.tok([p[0] for _, p in group], add_special_tokens=special,
                     return_offsets_mapping=True)
      for (k, p), ids, offsets in zip(group, enc["input_ids"],
                                      enc["offset_mapping"]):
        try:
          out[k] = self._finish(p, ids, offsets)
        except (RecordError, DataError) as e:
          out[k] = e
    return out

  def encode(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """Returns (input_ids int32 [L], loss_mask uint8 [L]) before shifting."""
    (result,) = self.encode_batch([ex])
    if isinstance(result, Exception):
      raise result
    return result

  def _check_markers(self, messages, ids, offsets, mask):
    spans = self._marker_spans(messages)
    if self.mask_policy == "last":
      spans = spans[-1:]
    marked = _overlap_mask(offsets, spans)
    # Whitespace between the end-of-turn token and the next turn is template
    # layout; templates differ on whether it sits inside the markers.
    tokens = self.tok.convert_ids_to_tokens(ids)
    text = [self.tok.convert_tokens_to_string([t]) for t in tokens]
    differ = [k for k in np.flatnonzero(marked != mask) if text[k].strip()]
    if differ:
      k = differ[0]
      raise DataError(
          "the chat template's {% generation %} markers and the prefix-"
          f"rendering mask disagree at token {k} ({text[k]!r}: markers say "
          f"{int(marked[k])}, prefix rendering says {int(mask[k])}); fix the "
          "template's markers")
