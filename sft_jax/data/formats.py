"""Record formats -> one canonical example: a chat, a prompt/completion, or text.

Formats: alpaca (instruction, input, output, optional system); messages
(role/content turns, with reasoning_content / thinking and tool_calls on
assistant turns, tool turns, and a conversation-level tools list); sharegpt
(from/value turns with human/gpt/system, and function_call/observation turns
for tool use, as LLaMA-Factory and glaive-style tool sets store them); xlam
(query, tools, answers: a user query answered by tool calls);
prompt_completion; text. Field names come from the source's `fields` config.
Every check raises `RecordError(reason, detail)`; reasons are stable keys.
"""

import dataclasses
import json

from sft_jax.data.errors import DataError, RecordError

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system",
                   "tool": "tool", "function_call": "function_call",
                   "observation": "tool", "function": "tool"}


@dataclasses.dataclass
class Example:
  """A record in canonical form.

  kind "chat": `messages` is a list of {"role", "content"} dicts; assistant
  turns may carry "reasoning_content" and "tool_calls" ([{"type": "function",
  "function": {"name", "arguments": dict}}]); `tools` is the conversation's
  JSON-schema tool list (None: no tools), passed to the chat template.
  kind "prompt_completion": `prompt`, `completion`, optional `system`.
  kind "text": `text`.
  """
  kind: str
  messages: list | None = None
  prompt: str | None = None
  completion: str | None = None
  system: str | None = None
  text: str | None = None
  tools: list | None = None


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
  if fields.query in keys and fields.answers in keys:
    return "xlam"
  if fields.instruction in keys and fields.output in keys:
    return "alpaca"
  if fields.prompt in keys and fields.completion in keys:
    return "prompt_completion"
  if fields.text in keys:
    return "text"
  raise DataError(
      f"cannot detect the format from fields {sorted(keys)}; set the source's "
      "format (alpaca|messages|sharegpt|xlam|prompt_completion|text) or its "
      "fields")


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


def _json_value(value, what: str):
  """A JSON field that datasets store either parsed or as a JSON string."""
  if isinstance(value, str):
    try:
      return json.loads(value)
    except json.JSONDecodeError as e:
      raise RecordError("malformed_tool_json",
                        f"{what} is not valid JSON ({e.msg})") from None
  return value


def tools_field(record, key):
  """The conversation's tool list ([] / absent: None)."""
  if record.get(key) in (None, "", []):
    return None
  tools = _json_value(record[key], f"field {key!r}")
  if not isinstance(tools, list) or not all(isinstance(t, dict)
                                            for t in tools):
    raise RecordError("malformed_tools",
                      f"field {key!r} must be a list of JSON-schema objects")
  return tools


def tool_call(call, what: str) -> dict:
  """One tool call in the OpenAI shape every chat template reads:
  {"type": "function", "function": {"name", "arguments": dict}}."""
  call = _json_value(call, what)
  if isinstance(call, dict) and isinstance(call.get("function"), dict):
    call = call["function"]
  if not isinstance(call, dict) or not isinstance(call.get("name"), str):
    raise RecordError("malformed_tool_call",
                      f"{what} must be an object with a string 'name'")
  args = call.get("arguments", call.get("parameters", {}))
  args = _json_value(args, f"{what}.arguments") if args != "" else {}
  if not isinstance(args, dict):
    raise RecordError("malformed_tool_call",
                      f"{what}.arguments must be a JSON object")
  return {"type": "function", "function": {"name": call["name"],
                                           "arguments": args}}


def _turns(record, list_key, role_key, content_key, role_map, fields):
  if list_key not in record or record[list_key] is None:
    raise RecordError("missing_field", f"no field {list_key!r}")
  turns = record[list_key]
  if not isinstance(turns, list) or not turns:
    raise RecordError("missing_field",
                      f"field {list_key!r} must be a non-empty list of turns")
  messages = []
  for i, t in enumerate(turns):
    where = f"{list_key}[{i}]"
    if not isinstance(t, dict):
      raise RecordError("malformed_turn", f"{where} is not an object")
    if role_key not in t:
      raise RecordError("missing_field", f"{where} has no {role_key!r}")
    role = role_map.get(t[role_key]) if isinstance(t[role_key], str) else None
    if role is None:
      raise RecordError("unknown_role", f"{where}.{role_key}={t[role_key]!r}")
    if role == "function_call":  # ShareGPT tool use: the value is the call(s)
      calls = _json_value(t.get(content_key), f"{where}.{content_key}")
      calls = calls if isinstance(calls, list) else [calls]
      message = {"role": "assistant", "content": "", "tool_calls": [
          tool_call(c, f"{where}.{content_key}") for c in calls]}
      if messages and messages[-1]["role"] == "assistant" and not (
          messages[-1].get("tool_calls")):
        # A thought followed by its call: one assistant turn.
        messages[-1]["tool_calls"] = message["tool_calls"]
      else:
        messages.append(message)
      continue
    message = {"role": role}
    calls = t.get(fields.tool_calls) if role == "assistant" else None
    if calls:
      if not isinstance(calls, list):
        raise RecordError("malformed_tool_call",
                          f"{where}.{fields.tool_calls} must be a list")
      message["tool_calls"] = [tool_call(c, f"{where}.{fields.tool_calls}[{k}]")
                               for k, c in enumerate(calls)]
    try:
      # A reply made only of tool calls has no text.
      message["content"] = _text(t, content_key, allow_empty=bool(calls)) or ""
    except RecordError as e:
      if not (calls and e.reason == "missing_field"):
        raise RecordError(e.reason, f"{where}: {e.detail}") from None
      message["content"] = ""
    if role == "assistant":
      for key in (fields.reasoning, "reasoning_content", "thinking"):
        reasoning = t.get(key)
        if isinstance(reasoning, str) and reasoning.strip():
          # Templates read one name or the other (Qwen3, GLM: reasoning_content;
          # gpt-oss: thinking); none reads both.
          message["reasoning_content"] = message["thinking"] = reasoning
          break
    if role == "tool":
      for key in ("name", "tool_call_id"):
        if isinstance(t.get(key), str):
          message[key] = t[key]
    messages.append(message)
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
        record, fields.messages, fields.role, fields.content, roles, fields),
                   tools=tools_field(record, fields.tools))
  if fmt == "sharegpt":
    return Example("chat", messages=_turns(
        record, fields.conversations, fields.sharegpt_role,
        fields.sharegpt_content, _SHAREGPT_ROLES, fields),
                   tools=tools_field(record, fields.tools))
  if fmt == "xlam":
    answers = _json_value(record.get(fields.answers), repr(fields.answers))
    if not isinstance(answers, list) or not answers:
      raise RecordError("malformed_tool_call",
                        f"field {fields.answers!r} must be a non-empty list")
    calls = [tool_call(a, f"{fields.answers}[{k}]")
             for k, a in enumerate(answers)]
    return Example("chat", messages=[
        {"role": "user", "content": _text(record, fields.query)},
        {"role": "assistant", "content": "", "tool_calls": calls}],
                   tools=tools_field(record, fields.tools))
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
