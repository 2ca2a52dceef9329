"""From records and text to prompt ids, stop ids, and back to text.

Prompts are rendered the way `transformers`' `apply_chat_template` tokenizes
them (the template carries any BOS itself, so no special tokens are added);
`raw` prompts are tokenized as plain text with the tokenizer's own special
tokens (BOS where the tokenizer adds one).
"""

import json
from typing import Any, Sequence

# A marker that no template or tokenizer treats specially; what the template
# writes right after it is the end-of-turn text.
_MARK = "\u2063END_OF_ASSISTANT_TURN\u2063"


def encode_prompt(tokenizer, prompt, *, raw: bool = False) -> list[int]:
  """Token ids of a prompt.

  Args:
    tokenizer: a transformers tokenizer (with a chat template unless raw).
    prompt: a string (a single user turn unless raw) or a list of
      {"role", "content"} messages ending with the turn to answer.
    raw: tokenize `prompt` (a string) as is, without the chat template.

  Returns:
    The ids, ending with the assistant-turn header when templated.
  """
  if raw:
    if not isinstance(prompt, str):
      raise ValueError("a raw prompt must be a string, not messages")
    return list(tokenizer(prompt).input_ids)
  if tokenizer.chat_template is None:
    raise ValueError(
        "the tokenizer has no chat template: pass raw prompts (--raw) or a "
        "tokenizer with one")
  messages = ([{"role": "user", "content": prompt}]
              if isinstance(prompt, str) else list(prompt))
  text = tokenizer.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)
  return list(tokenizer(text, add_special_tokens=False).input_ids)


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


def split_record(record: dict[str, Any], where: str):
  """A (prompt, reference, raw) triple from an evaluation record.

  Records are either chat-style, {"messages": [..., {"role": "assistant",
  "content": REFERENCE}]}, where every message before the last is the
  prompt; or completion-style, {"prompt": TEXT, "completion": REFERENCE},
  where the prompt is a raw string (no template).

  Args:
    record: the parsed record.
    where: "file:line" for error messages.
  """
  if "messages" in record:
    messages = record["messages"]
    if (not isinstance(messages, list) or len(messages) < 2
        or not all(isinstance(m, dict) and "role" in m and "content" in m
                   for m in messages)):
      raise ValueError(
          f"{where}: 'messages' must be a list of at least two "
          "{'role', 'content'} objects")
    if messages[-1]["role"] != "assistant":
      raise ValueError(
          f"{where}: the last message must be the assistant's reference "
          f"answer, got role {messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"], False
  if "prompt" in record and "completion" in record:
    return record["prompt"], record["completion"], True
  raise ValueError(
      f"{where}: expected a 'messages' list or 'prompt' and 'completion' "
      f"fields, got keys {sorted(record)}")


def read_jsonl(path: str) -> list[tuple[dict[str, Any], str]]:
  """(record, "path:line") pairs of a JSONL file; blank lines are skipped,
  a line that is not a JSON object raises naming file and line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{i}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got "
                         f"{type(record).__name__}")
      out.append((record, where))
  return out
