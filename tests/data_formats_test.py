"""Reasoning traces and tool use in records: field maps, rendering, masks."""

import json

import numpy as np
import pytest

import real_templates as rt
from sft_jax.data import config as config_lib
from sft_jax.data import formats
from sft_jax.data import render
from sft_jax.data.errors import RecordError

FIELDS = config_lib.fields_config()
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city name"}}}}}
WANT_CALL = {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris"}}}


def _example(record, fmt="auto"):
  fmt = formats.detect(record, FIELDS) if fmt == "auto" else fmt
  return fmt, formats.to_example(record, fmt, FIELDS)


def test_messages_keep_reasoning_tool_calls_and_tool_turns():
  record = {"tools": json.dumps([TOOL]), "messages": [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": None, "thinking": "Look it up.",
       "tool_calls": [{"function": {"name": "get_weather",
                                    "arguments": '{"city": "Paris"}'}}]},
      {"role": "tool", "content": "21 C", "tool_call_id": "c1"},
      {"role": "assistant", "content": "21 degrees."}]}
  fmt, ex = _example(record)
  assert fmt == "messages" and ex.tools == [TOOL]
  assert ex.messages[1] == {"role": "assistant", "content": "",
                            "tool_calls": [WANT_CALL],
                            "reasoning_content": "Look it up.",
                            "thinking": "Look it up."}
  assert ex.messages[2] == {"role": "tool", "content": "21 C",
                            "tool_call_id": "c1"}


def test_sharegpt_function_call_and_observation_turns():
  # LLaMA-Factory's tool format (glaive_toolcall): the call is JSON text,
  # the tool's answer an observation turn.
  record = {"tools": json.dumps([TOOL["function"]]), "conversations": [
      {"from": "human", "value": "Weather in Paris?"},
      {"from": "function_call",
       "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
      {"from": "observation", "value": '{"celsius": 21}'},
      {"from": "gpt", "value": "21 degrees."}]}
  fmt, ex = _example(record)
  assert fmt == "sharegpt"
  assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool",
                                              "assistant"]
  assert ex.messages[1]["tool_calls"] == [WANT_CALL]
  assert ex.tools == [TOOL["function"]]


def test_xlam_records():
  record = {"query": "Weather in Paris?", "tools": json.dumps([TOOL]),
            "answers": json.dumps([{"name": "get_weather",
                                    "arguments": {"city": "Paris"}}])}
  fmt, ex = _example(record)
  assert fmt == "xlam"
  assert ex.messages == [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [WANT_CALL]}]


@pytest.mark.parametrize("record,reason", [
    ({"query": "q", "answers": "[{\"name\": 1}]"}, "malformed_tool_call"),
    ({"query": "q", "answers": "not json"}, "malformed_tool_json"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"name": "f", "arguments": "[1]"}]}]},
     "malformed_tool_call"),
    ({"tools": "{}", "messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]},
     "malformed_tools"),
])
def test_bad_tool_fields_are_record_errors(record, reason):
  with pytest.raises(RecordError) as e:
    _example(record)
  assert e.value.reason == reason


def test_tool_calls_supervised_tool_results_not_through_sharegpt():
  name = "Qwen/Qwen2.5-7B-Instruct"
  tok = rt.tokenizer(name)
  record = {"tools": json.dumps([TOOL]), "conversations": [
      {"from": "human", "value": "Weather in Paris?"},
      {"from": "function_call",
       "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
      {"from": "observation", "value": '{"celsius": 21}'},
      {"from": "gpt", "value": "21 degrees."}]}
  _, ex = _example(record)
  ids, mask = render.Encoder(tok, rt.BY_NAME[name].text, "assistant").encode(ex)
  text = tok.decode(ids)
  assert "<tools>\n" + json.dumps(TOOL) in text  # the tools reach the template
  sup = tok.decode(ids[mask > 0])
  assert sup == ('<tool_call>\n{"name": "get_weather", "arguments": '
                 '{"city": "Paris"}}\n</tool_call><|im_end|>21 degrees.'
                 "<|im_end|>")
  assert '{"celsius": 21}' in text and "celsius" not in sup
  # Token by token: every supervised token is in an assistant turn.
  assert mask.sum() == len(tok(
      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
      "\n</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]) + len(
          tok("21 degrees.<|im_end|>", add_special_tokens=False)["input_ids"])
  assert np.isin(mask, (0, 1)).all()
