"""From records and text to prompt ids, stop ids, and back to text.

Prompts are rendered the way `transformers`' `apply_chat_template` tokenizes
them (the template carries any BOS itself, so no special tokens are added);
`raw` prompts are tokenized as plain text with the tokenizer's own special
tokens (BOS where the tokenizer adds one).
"""

import json
import os
from typing import Any, Sequence

from sft_jax import errors


class PromptError(errors.UserError, ValueError):
  """A prompt or evaluation record that cannot be used; names file:line."""
  what = "data"

# A marker that no template or tokenizer treats specially; what the template
# writes right after it is the end-of-turn text.
_MARK = "\u2063END_OF_ASSISTANT_TURN\u2063"


def encode_prompt(tokenizer, prompt, *, raw: bool = False,
                  template_kwargs: dict | None = None,
                  tools: list | None = None) -> list[int]:
  """Token ids of a prompt.

  The context training supervised each reply after (sft_jax/data/turns.py):
  render(turns, add_generation_prompt=True) with the same template kwargs.

  Args:
    tokenizer: a transformers tokenizer (with a chat template unless raw).
    prompt: a string (a single user turn unless raw) or a list of
      {"role", "content"} messages ending with the turn to answer.
    raw: tokenize `prompt` (a string) as is, without the chat template.
    template_kwargs: keyword arguments for the chat template, as the
      training source's chat_template_kwargs (e.g. enable_thinking).
    tools: the JSON-schema tool list the conversation offers.

  Returns:
    The ids, ending with the assistant-turn header when templated.
  """
  if raw:
    if not isinstance(prompt, str):
      raise PromptError("a raw prompt must be a string, not messages")
    return list(tokenizer(prompt).input_ids)
  if tokenizer.chat_template is None:
    raise PromptError(
        "the tokenizer has no chat template: pass raw prompts (--raw) or a "
        "tokenizer with one")
  messages = ([{"role": "user", "content": prompt}]
              if isinstance(prompt, str) else list(prompt))
  text = tokenizer.apply_chat_template(
      messages, tools=tools, add_generation_prompt=True, tokenize=False,
      **(template_kwargs or {}))
  return list(tokenizer(text, add_special_tokens=False).input_ids)


def template_kwargs_of_run(run_dir: str) -> dict:
  """The chat_template_kwargs a run trained with ({} when its sources set
  none, or set different ones)."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    return template_kwargs_of_data(json.load(f).get("data", {}))


def template_kwargs_of_data(data: dict) -> dict:
  """The chat_template_kwargs of a `data` config section (as a dict): those
  its sources share, else {}."""
  sources = list(data.get("sources", {}).values()) + list(
      data.get("eval_sources", {}).values())
  kwargs = {json.dumps(s.get("chat_template_kwargs") or {}, sort_keys=True)
            for s in sources}
  return json.loads(kwargs.pop()) if len(kwargs) == 1 else {}


def end_of_turn_id(tokenizer) -> int | None:
  """The special token the chat template closes an assistant turn with.

  E.g. <|im_end|> (ChatML), <end_of_turn> (Gemma), <|eot_id|> (Llama 3);
  None when there is no template or it closes turns with plain text.
  """
  if tokenizer.chat_template is None:
    return None
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": _MARK}]
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  if _MARK not in text:
    return None
  suffix = text.split(_MARK, 1)[1].lstrip(" ")
  if not suffix:
    return None
  ids = tokenizer(suffix, add_special_tokens=False).input_ids
  special = set(tokenizer.all_special_ids) | set(
      tokenizer.added_tokens_encoder.values())
  return ids[0] if ids and ids[0] in special else None


def stop_ids(tokenizer, extra: Sequence[int] = ()) -> list[int]:
  """EOS, the template's end-of-turn id and `extra` ids (e.g. from a
  generation_config.json), deduplicated and sorted."""
  ids = set(int(i) for i in extra)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  eot = end_of_turn_id(tokenizer)
  if eot is not None:
    ids.add(int(eot))
  return sorted(ids)


def decode(tokenizer, ids: Sequence[int]) -> str:
  """Text of generated ids (stop id already removed), specials dropped."""
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def split_record(record: dict[str, Any], where: str, *, fields=None,
                 prompt_as_user_turn: bool = True):
  """A (prompt, reference, raw) triple from an evaluation record.

  Any training record format is accepted (messages, sharegpt, alpaca,
  prompt_completion; see sft_jax.data.formats), and rendered as training
  rendered it: the reference is the last assistant turn and the prompt every
  turn before it; a prompt_completion record is a user turn (or, with
  `prompt_as_user_turn=False`, raw text).

  Args:
    record: the parsed record.
    where: "file:line" for error messages.
    fields: the data `fields` config (None: the default field names).
    prompt_as_user_turn: as the training source's option of that name.

  Returns:
    (prompt: messages list or raw string, reference: str, raw: bool).
  """
  example = _example(record, where, fields)
  if example.kind == "prompt_completion":
    if not prompt_as_user_turn:
      return example.prompt, example.completion, True
    messages = ([{"role": "system", "content": example.system}]
                if example.system else [])
    messages.append({"role": "user", "content": example.prompt})
    return messages, example.completion, False
  if example.kind != "chat":
    raise PromptError(f"{where}: a {example.kind!r} record has no reference "
                     "answer to evaluate against")
  messages = example.messages
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  if last != len(messages) - 1:
    raise PromptError(f"{where}: turns follow the last assistant turn; the "
                     "reference answer must be the final turn")
  if last == 0:
    raise PromptError(f"{where}: the conversation starts with the assistant "
                     "turn: there is no prompt")
  return messages[:last], messages[last]["content"], False


def tools_of_record(record: dict[str, Any], where: str, *,
                    fields=None) -> list | None:
  """The JSON-schema tool list a record offers (None: none), rendered into
  its prompt as training rendered it."""
  from sft_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from sft_jax.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  from sft_jax.data import formats  # pylint: disable=g-import-not-at-top
  fields = fields if fields is not None else data_config.fields_config()
  if not isinstance(record, dict):
    return None
  try:
    return formats.tools_field(record, fields.tools)
  except data_errors.RecordError as e:
    raise ValueError(f"{where}: {e}") from None


def prompt_of_record(record: dict[str, Any], where: str, *, raw: bool,
                     fields=None):
  """The prompt of a generation request record.

  {"prompt": TEXT} (a user turn, or raw text with `raw`), {"messages":
  [...]} (every turn, or every turn before a final assistant turn), or any
  record `split_record` accepts.
  """
  if isinstance(record, dict) and set(record) <= {"prompt", "id", "system"}:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
      raise PromptError(f"{where}: 'prompt' must be a non-empty string")
    if raw:
      return prompt
    system = record.get("system")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
  if (isinstance(record, dict) and isinstance(record.get("messages"), list)
      and record["messages"]
      and isinstance(record["messages"][-1], dict)
      and record["messages"][-1].get("role") != "assistant"):
    messages = record["messages"]
    for i, m in enumerate(messages):
      if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
          or not (isinstance(m.get("content"), str) or (
              m.get("content") is None and m.get("tool_calls")))):
        raise PromptError(f"{where}: messages[{i}] must be an object with "
                         "string 'role' and 'content'")
    return [_prompt_turn(m, f"{where}: messages[{i}]")
            for i, m in enumerate(messages)]
  prompt, _, is_raw = split_record(record, where, fields=fields,
                                   prompt_as_user_turn=not raw)
  if raw and not is_raw:
    raise PromptError(f"{where}: --raw needs a plain-text prompt, but this "
                     "record is a conversation")
  return prompt


def _prompt_turn(m: dict, where: str) -> dict:
  """A prompt turn as training renders it: tool calls (normalised as in
  training), reasoning and tool-result fields kept."""
  from sft_jax.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  from sft_jax.data import formats  # pylint: disable=g-import-not-at-top
  turn = {k: m[k] for k in ("role", "content", "reasoning_content", "thinking",
                            "name", "tool_call_id") if k in m}
  turn["content"] = turn.get("content") or ""
  reasoning = turn.get("reasoning_content") or turn.get("thinking")
  if reasoning:  # as training passes it: under both names
    turn["reasoning_content"] = turn["thinking"] = reasoning
  if m.get("tool_calls"):
    try:
      turn["tool_calls"] = [formats.tool_call(c, where)
                            for c in m["tool_calls"]]
    except data_errors.RecordError as e:
      raise ValueError(f"{e.detail}") from None
  return turn


def _example(record, where: str, fields):
  # Imported here: sft_jax.data pulls in grain, which generation alone does
  # not need.
  from sft_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from sft_jax.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  from sft_jax.data import formats  # pylint: disable=g-import-not-at-top
  fields = fields if fields is not None else data_config.fields_config()
  try:
    return formats.to_example(record, formats.detect(record, fields), fields)
  except (data_errors.DataError, data_errors.RecordError) as e:
    raise PromptError(f"{where}: {e}") from None


def read_jsonl(path: str) -> list[tuple[dict[str, Any], str]]:
  """(record, "path:line") pairs of a JSONL file; blank lines are skipped,
  a line that is not a JSON object raises naming file and line."""
  out = []
  with open(path, "rb") as f:
    for i, raw in enumerate(f, start=1):
      where = f"{path}:{i}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PromptError(f"{where}: byte {raw[e.start]:#04x} at column "
                          f"{e.start + 1} is not UTF-8") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise PromptError(f"{where}: expected a JSON object, got "
                         f"{type(record).__name__}")
      out.append((record, where))
  return out
