"""Record formats -> one canonical example: a chat, a prompt/completion, or text.

Formats: alpaca (instruction, input, output, optional system); messages
(role/content turns); sharegpt (from/value turns with human/gpt/system);
prompt_completion; text. Field names come from the source's `fields` config.
Every check raises `RecordError(reason, detail)`; reasons are stable keys.
"""

import dataclasses

from sft_jax.data.errors import DataError, RecordError

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system",
                   "tool": "tool"}


@dataclasses.dataclass
class Example:
  """A record in canonical form.

  kind "chat": `messages` is a list of {"role", "content"} dicts.
  kind "prompt_completion": `prompt`, `completion`, optional `system`.
  kind "text": `text`.
  """
  kind: str
  messages: list | None = None
  prompt: str | None = None
  completion: str | None = None
  system: str | None = None
  text: str | None = None


def detect(record, fields) -> str:
  """The format of a record, from which fields it has."""
  if not isinstance(record, dict):
    raise DataError(f"cannot detect the format of a {type(record).__name__} "
                    "record; records must be JSON objects")
  keys = set(record)
  if fields.messages in keys:
    return "messages"
  if fields.conversations in keys:
    return "sharegpt"
  if fields.instruction in keys and fields.output in keys:
    return "alpaca"
  if fields.prompt in keys and fields.completion in keys:
    return "prompt_completion"
  if fields.text in keys:
    return "text"
  raise DataError(
      f"cannot detect the format from fields {sorted(keys)}; set the source's "
      "format (alpaca|messages|sharegpt|prompt_completion|text) or its fields")


def _text(record, key: str, *, optional: bool = False, allow_empty=False):
  if key not in record or record[key] is None:
    if optional:
      return None
    raise RecordError("missing_field", f"no field {key!r}")
  value = record[key]
  if not isinstance(value, str):
    raise RecordError("non_string_content",
                      f"field {key!r} is {type(value).__name__}, not a string")
  if not value.strip() and not allow_empty:
    if optional:
      return None
    raise RecordError("empty_content", f"field {key!r} is empty")
  return value


def _turns(record, list_key, role_key, content_key, role_map):
  if list_key not in record or record[list_key] is None:
    raise RecordError("missing_field", f"no field {list_key!r}")
  turns = record[list_key]
  if not isinstance(turns, list) or not turns:
    raise RecordError("missing_field",
                      f"field {list_key!r} must be a non-empty list of turns")
  messages = []
  for i, t in enumerate(turns):
    if not isinstance(t, dict):
      raise RecordError("malformed_turn", f"{list_key}[{i}] is not an object")
    if role_key not in t:
      raise RecordError("missing_field", f"{list_key}[{i}] has no {role_key!r}")
    role = role_map.get(t[role_key]) if isinstance(t[role_key], str) else None
    if role is None:
      raise RecordError("unknown_role",
                        f"{list_key}[{i}].{role_key}={t[role_key]!r}")
    try:
      content = _text(t, content_key)
    except RecordError as e:
      raise RecordError(e.reason, f"{list_key}[{i}]: {e.detail}") from None
    messages.append({"role": role, "content": content})
  if not any(m["role"] == "assistant" for m in messages):
    raise RecordError("no_assistant_turn", "the conversation has no reply")
  return messages


def to_example(record, fmt: str, fields) -> Example:
  """Converts one record of format `fmt` (not "auto") to an Example."""
  if not isinstance(record, dict):
    raise RecordError("not_an_object",
                      f"record is {type(record).__name__}, not an object")
  if fmt == "messages":
    roles = {r: r for r in ROLES}
    return Example("chat", messages=_turns(
        record, fields.messages, fields.role, fields.content, roles))
  if fmt == "sharegpt":
    return Example("chat", messages=_turns(
        record, fields.conversations, fields.sharegpt_role,
        fields.sharegpt_content, _SHAREGPT_ROLES))
  if fmt == "alpaca":
    instruction = _text(record, fields.instruction)
    extra = _text(record, fields.input, optional=True)
    output = _text(record, fields.output)
    system = _text(record, fields.system, optional=True)
    user = instruction + ("\n\n" + extra if extra else "")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": output}]
    return Example("chat", messages=messages)
  if fmt == "prompt_completion":
    return Example("prompt_completion", prompt=_text(record, fields.prompt),
                   completion=_text(record, fields.completion),
                   system=_text(record, fields.system, optional=True))
  if fmt == "text":
    return Example("text", text=_text(record, fields.text))
  raise DataError(f"unknown format {fmt!r}")
