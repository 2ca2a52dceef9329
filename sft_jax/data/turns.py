"""The one mask rule: a supervised turn is exactly what the model generates.

For assistant turn k of a conversation, with P = render(turns[:k],
add_generation_prompt=True) (the context at inference) and U =
render(turns[:k + 1]):

- the reply is U after P (after the longest common prefix of P and U when the
  generation prompt opens text the turn rendering does not, e.g. the
  `<think>\\n` DeepSeek-R1 prompts with: the example is then P + reply);
- it is supervised from its first character through the first stop token in
  it (EOS or the template's end-of-turn token), which the model must produce
  to stop; what the template writes after that (whitespace, an EOS written
  only after the final turn, a next-turn header) is not supervised;
- a template that ends a turn with no token at all (GLM-4 writes the next
  turn's header instead) has the turn ended by that header's first token,
  which is supervised, or by an EOS appended after the final turn, as the
  model's own fine-tuning code does.

A turn is prefix-stable when the full rendering F of the conversation starts
with P + reply: then F is the example and the turn a span in it. A template
that rewrites history (Qwen3 and GLM strip reasoning from earlier turns,
DeepSeek-R1 drops it from every reply, ...) makes F differ from what the
model saw when it generated turn k; such a turn becomes its own example
P + reply (history "split"), or stays a span of F where its reply appears
there (history "full").
"""

import dataclasses
import re

from sft_jax.data.errors import RecordError

# Text no template treats specially: what a template writes after it is the
# end of a turn.
_MARK = "\u2063END_OF_TURN_PROBE\u2063"
# For probing templates that render only with a tool list (Command R+'s
# tool-use template).
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe", "description": "probe", "parameters": {
        "type": "object", "required": ["x"], "properties": {
            "x": {"type": "string", "description": "probe"}}}}}]


def common_prefix(a: str, b: str) -> int:
  """Length of the longest common prefix (slice compares run in C)."""
  lo, hi = 0, min(len(a), len(b))
  if a[:hi] == b[:hi]:
    return hi
  while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


@dataclasses.dataclass
class Turn:
  index: int  # position of the assistant message in the conversation
  context: str  # what the model reads before generating the turn
  reply: str  # what it generates, stop token included
  appended_eos: bool  # the turn is ended by an EOS the template never writes
  stable: bool  # the full rendering starts with context + reply
  reasoning_lost: bool = False  # the template did not render its reasoning


@dataclasses.dataclass
class Plan:
  """The examples of one conversation: texts with supervised char spans."""
  texts: list  # [str]
  spans: list  # [[(start, end)]] per text
  turns: list  # [Turn]
  split: bool  # some turn got its own example (the history was rewritten)
  full_index: int | None  # which text is the full rendering (None: none)


class Renderer:
  """Applies the mask rule with one tokenizer, template and kwargs."""

  def __init__(self, tok, template: str, kwargs: dict | None = None):
    self.tok = tok
    self.template = template
    self.kwargs = dict(kwargs or {})
    specials = sorted({t for t in tok.all_special_tokens} |
                      set(tok.added_tokens_encoder), key=len, reverse=True)
    self._special_re = re.compile(
        r"\s*(" + "|".join(re.escape(t) for t in specials if t) + ")"
    ) if specials else None
    self.eos_text = tok.eos_token or ""
    self.end_of_turn = self._end_of_turn()
    self.stops = [s for s in {self.eos_text, self.end_of_turn} if s]
    self._enders = {}

  def render(self, messages, add_generation_prompt: bool, tools=None) -> str:
    try:
      return self.tok.apply_chat_template(
          messages, chat_template=self.template, tools=tools, tokenize=False,
          add_generation_prompt=add_generation_prompt, **self.kwargs)
    except Exception as e:  # pylint: disable=broad-except
      # Templates raise to refuse input (e.g. roles that do not alternate).
      raise RecordError("template_error", str(e).strip() or
                        type(e).__name__) from None

  def _render_probe(self, messages) -> str:
    try:
      return self.render(messages, False)
    except RecordError:
      return self.render(messages, False, _PROBE_TOOLS)

  def _probe_end(self, next_role: str | None) -> str | None:
    """The first special token a template writes after a reply: with no next
    turn, its end-of-turn token; before a `next_role` turn, the token that
    ends the reply there (for templates that write none, the next header's)."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": _MARK}]
    if next_role is not None:
      messages.append({"role": next_role, "content": "x"})
    try:
      text = self._render_probe(messages)
    except RecordError:
      return None
    if _MARK not in text or self._special_re is None:
      return None
    m = self._special_re.match(text.split(_MARK, 1)[1].lstrip(" "))
    return m.group(1) if m else None

  def _end_of_turn(self) -> str | None:
    """The special token(s) a template closes every reply with: the first
    special token after a reply, and an EOS right after it when the template
    writes one there whether or not a turn follows (Command R7B:
    <|END_RESPONSE|><|END_OF_TURN_TOKEN|>)."""
    first = self._probe_end(None)
    if first is None:
      return None
    texts = []
    for extra in ([], [{"role": "user", "content": "x"}]):
      try:
        texts.append(self._render_probe(
            [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": _MARK}] + extra).split(
                 _MARK, 1)[-1])
      except RecordError:
        return first
    a, b = (t.lstrip(" ") for t in texts)
    end = a.find(first) + len(first)
    if (self.eos_text and self.eos_text != first and
        a[end:].startswith(self.eos_text) and b[end:].startswith(
            self.eos_text) and a[:end] == b[:end]):
      return first + self.eos_text
    return first

  def _ender(self, next_role: str) -> str | None:
    if next_role not in self._enders:
      self._enders[next_role] = self._probe_end(next_role) or (
          self._probe_end("user") if next_role != "user" else None)
    return self._enders[next_role]

  def _turn(self, messages, i, tools, full) -> Turn:
    context = self.render(messages[:i], True, tools) if i else (
        self._empty_prompt(tools))
    upto = full if i == len(messages) - 1 else self.render(
        messages[:i + 1], False, tools)
    start = common_prefix(context, upto)
    if start < len(context):
      start = self._reply_start(messages, i, tools, context, upto, start)
    elif not context:
      # An opening reply the template cannot prompt for: its header (and any
      # default system prompt before it) is context, the content onwards not.
      start = self.locate(messages[:1], 0, tools, "", upto)
      context = upto[:start]
    reply = upto[start:]
    if not reply.strip():
      raise RecordError("no_supervised_tokens",
                        f"assistant turn {i} renders as nothing to generate")
    cut = [(reply.find(s), -len(s), s) for s in self.stops if s in reply]
    appended = False
    if cut:
      at, _, stop = min(cut)
      reply = reply[:at + len(stop)]
    elif i + 1 < len(messages):
      # No end-of-turn token: the next turn's first token ends this one, with
      # any whitespace the template writes before it.
      ender = self._ender(messages[i + 1]["role"])
      rest = full[len(context) + len(reply):] if full.startswith(
          context + reply) else ""
      m = self._special_re.match(rest) if self._special_re else None
      if m and (ender is None or m.group(1) == ender):
        reply += rest[:m.end()]
      elif ender is not None:
        reply += ender
    elif self.eos_text:
      reply, appended = reply + self.eos_text, True
    body = full + (self.eos_text if appended else "")
    reasoning = messages[i].get("reasoning_content")
    return Turn(i, context, reply, appended, body.startswith(context + reply),
                bool(reasoning) and reasoning.strip() not in reply)

  def _reply_start(self, messages, i, tools, context, upto, start) -> int:
    """Where turn i's reply starts in `upto` when the context at generation
    time is not a prefix of it."""
    history = self.render(messages[:i], False, tools) if i else ""
    if context.startswith(history) and start >= len(history):
      # The generation prompt opens text the turn rendering does not write
      # (DeepSeek-R1, QwQ: "<think>\n"): the reply is what follows the part
      # they share, cut at a token boundary.
      a, b = (self.tok(t, add_special_tokens=False,
                       return_offsets_mapping=True) for t in (context, upto))
      n = 0
      for x, y in zip(a["input_ids"], b["input_ids"]):
        if x != y or b["offset_mapping"][n][1] > start:
          break
        n += 1
      return b["offset_mapping"][n - 1][1] if n else 0
    # Earlier text renders differently once the turn follows (Mistral moves
    # the system prompt to the last user turn).
    return self.locate(messages[:i + 1], i, tools, context, upto)

  def locate(self, messages, i, tools, context, text) -> int:
    """Where assistant turn i starts in `text` (a rendering of `messages`):
    after the generation prompt's text, before the turn's content."""
    probe = list(messages)
    probe[i] = dict(messages[i], content=_MARK + messages[i].get("content", ""))
    content_at = common_prefix(text, self.render(probe, False, tools))
    history = self.render(messages[:i], False, tools) if i else ""
    prompt = context[len(history):] if context.startswith(history) else ""
    at = text.rfind(prompt, 0, content_at) if prompt else -1
    return at + len(prompt) if at >= 0 else content_at

  def span_in(self, full, messages, turn, tools) -> tuple[int, int]:
    """Where a turn that is not prefix-stable sits in the full rendering:
    from its start through the next stop token."""
    start = self.locate(messages, turn.index, tools, turn.context, full)
    ends = [(full.find(s, start), s) for s in self.stops]
    ends = [e + len(s) for e, s in ends if e >= 0]
    return start, min(ends) if ends else len(full)

  def _empty_prompt(self, tools) -> str:
    try:  # templates that write a default system prompt do so here too
      return self.render([], True, tools)
    except RecordError:
      return ""

  def plan(self, messages, policy: str, history: str, tools=None) -> Plan:
    """The examples of one conversation under a mask policy and history mode.

    Raises RecordError (reason, detail) when no example can be made.
    """
    full = self.render(messages, False, tools)
    if policy == "all":
      return Plan([full], [[(0, len(full))]], [], False, 0)
    index = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if policy == "last":
      index = index[-1:]
    turns = [self._turn(messages, i, tools, full) for i in index]
    body = full + (self.eos_text if turns and turns[-1].appended_eos and
                   turns[-1].index == len(messages) - 1 else "")
    stable = [t for t in turns if t.stable]
    texts, spans = [], []
    if stable or history == "full":
      texts.append(body)
      spans.append([(len(t.context), len(t.context) + len(t.reply))
                    for t in stable])
      if history == "full":
        spans[0] += [self.span_in(body, messages, t, tools) for t in turns
                     if not t.stable]
        spans[0].sort()
    for t in turns:
      if not t.stable and history == "split":
        texts.append(t.context + t.reply)
        spans.append([(len(t.context), len(t.context) + len(t.reply))])
    split = any(not t.stable for t in turns) and history == "split"
    return Plan(texts, spans, turns, split,
                0 if stable or history == "full" else None)
