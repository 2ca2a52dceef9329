"""The mask rule on the real chat templates of popular models.

For every template (tests/real_templates.py, sources in
tests/chat_templates/SOURCES.md) and every case, each assistant turn must be
supervised exactly once, right after the context the model reads at inference
(render(turns[:k], add_generation_prompt=True), token for token where the
tokenizer allows), through the template's end-of-turn text and no further;
tool results and user text never; no doubled BOS. A few templates also get
their supervised text spelled out.
"""

import numpy as np
import pytest

import real_templates as rt
from sft_jax.data import render
from sft_jax.data.formats import Example

_PARAMS = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string", "description": "The city name"}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": _PARAMS}}]
_CALL = {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris"}}}
_RESULT = '{"celsius": 21}'

CASES = {
    "single": [{"role": "user", "content": "What is two plus two?"},
               {"role": "assistant", "content": "It is four."}],
    "system_multi": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."}],
    # A mask found by searching for the reply would land in the user turn.
    "echo": [{"role": "user", "content": "the quick brown fox"},
             {"role": "assistant", "content": "the quick brown fox"},
             {"role": "user", "content": "the quick brown fox"},
             {"role": "assistant", "content": "the quick brown fox"}],
    "unicode": [{"role": "user", "content": "Grüße aus Köln? 日本語で"},
                {"role": "assistant", "content": "Ja, gerne: こんにちは 🙂 — ok"}],
    "whitespace": [{"role": "user", "content": "  hello there  \n"},
                   {"role": "assistant", "content": "\n  It is four.  \n"}],
    "reasoning": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four.",
         "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "And plus one?"},
        {"role": "assistant", "content": "Five.",
         "reasoning_content": "Four and one make five."}],
    "tools": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_CALL]},
        {"role": "tool", "name": "get_weather", "content": _RESULT},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}],
}


def _case(t, name):
  messages = [dict(m) for m in CASES[name]]
  if not t.system and messages[0]["role"] == "system":
    messages = messages[1:]
  tools = TOOLS if name == "tools" or t.needs_tools else None
  return messages, tools


def _runs(mask):
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]).astype(int)))
  return list(zip(edges[::2], edges[1::2]))


def _supervised(tok, encoded):
  """[(context ids, supervised ids)] for every supervised run."""
  out = []
  for ids, mask in encoded.examples:
    for a, b in _runs(mask):
      out.append((ids[:a].tolist(), ids[a:b].tolist()))
  return out


def _expected_end(t, messages, k, text):
  """What the model writes to end assistant turn k: the template's
  end-of-turn text, or EOS where a turn ends with it (Command R7B ends tool
  calls with <|END_ACTION|><|END_OF_TURN_TOKEN|>)."""
  if t.eot is not None:
    return t.eos if not text.endswith(t.eot) else t.eot
  # GLM writes no end-of-turn token: the next turn's first token ends the
  # reply (or EOS after the last one), as GLM's own fine-tuning code trains.
  nxt = messages[k + 1]["role"] if k + 1 < len(messages) else None
  return {"user": "<|user|>", "tool": "<|observation|>", None: t.eos}[nxt]


TEMPLATE_CASES = [(t.name, c) for t in rt.TEMPLATES for c in CASES
                  if c != "tools" or t.tools]


def test_at_least_fifteen_real_templates():
  files = {t.file for t in rt.TEMPLATES}
  assert len(files) >= 15
  with open(f"{rt.DIR}/SOURCES.md", encoding="utf-8") as f:
    sources = f.read()
  assert all(f in sources for f in files)


@pytest.mark.parametrize("name,case", TEMPLATE_CASES)
def test_supervised_turns_follow_the_rule(name, case):
  t = rt.BY_NAME[name]
  tok = rt.tokenizer(name)
  kwargs = dict(t.kwargs)
  messages, tools = _case(t, case)
  enc = render.Encoder(tok, t.text, "assistant", template_kwargs=kwargs)
  encoded = enc.encode_all(Example("chat", messages=messages, tools=tools))
  runs = _supervised(tok, encoded)
  turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
  assert len(runs) == len(turns)  # each turn supervised exactly once
  for k in turns:
    prompt = tok.apply_chat_template(messages[:k], tools=tools,
                                     add_generation_prompt=True,
                                     tokenize=False, **kwargs)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # The run whose context is the generation-time prompt: token for token,
    # or (whitespace merged across the boundary) the same text.
    mine = [(c, s) for c, s in runs if c == prompt_ids] or [
        (c, s) for c, s in runs
        if tok.decode(c + s).startswith(prompt) and len(tok.decode(c)) <=
        len(prompt) < len(tok.decode(c + s))]
    assert len(mine) == 1, (k, prompt[-40:])
    context, sup = mine[0]
    text = tok.decode(sup)
    end = _expected_end(t, messages, k, text)
    assert text.endswith(end), (k, text)
    # Through the end of the turn and no further: one end-of-turn, at the end.
    assert text.count(end) == 1, (k, text)
    content = messages[k]["content"].strip()
    assert content in text
    if messages[k].get("tool_calls"):
      assert "get_weather" in text and "Paris" in text
    if t.bos:  # no doubled BOS
      assert not tok.decode(context).startswith(t.bos * 2)
  for context, sup in runs:
    text = tok.decode(sup)
    assert _RESULT not in text and "celsius" not in text  # results: context
    for m in messages:
      if m["role"] == "user" and m["content"] not in (
          messages[k]["content"] for k in turns):
        assert m["content"].strip() not in text
  for ids, _ in encoded.examples:
    bos = tok.bos_token_id
    assert bos is None or not (len(ids) > 1 and ids[0] == bos == ids[1])


def _texts(tok, name, case, **kw):
  t = rt.BY_NAME[name]
  messages, tools = _case(t, case)
  enc = render.Encoder(tok, t.text, "assistant",
                       template_kwargs=kw.get("kwargs", dict(t.kwargs)),
                       history=kw.get("history", "split"))
  encoded = enc.encode_all(Example("chat", messages=messages, tools=tools))
  return encoded, [(tok.decode(c), tok.decode(s))
                   for c, s in _supervised(tok, encoded)]


def test_qwen3_reasoning_is_trained_in_the_context_it_was_generated():
  name = "Qwen/Qwen3-0.6B"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "reasoning")
  # The template strips reasoning from turns before the last user turn, so
  # each turn is its own example: the history the model saw back then.
  assert encoded.split and len(encoded.examples) == 2
  assert sorted(s for _, s in runs) == [
      "<think>\nFour and one make five.\n</think>\n\nFive.<|im_end|>",
      "<think>\nTwo and two make four.\n</think>\n\nIt is four.<|im_end|>"]
  # history="full": one sequence, the earlier reply as the full rendering has
  # it (reasoning stripped).
  encoded, runs = _texts(tok, name, "reasoning", history="full")
  assert not encoded.split and len(encoded.examples) == 1
  assert [s for _, s in runs] == [
      "It is four.<|im_end|>",
      "<think>\nFour and one make five.\n</think>\n\nFive.<|im_end|>"]
  # enable_thinking=False: the empty think block is part of the prompt.
  _, runs = _texts(tok, name, "single", kwargs={"enable_thinking": False})
  assert runs[0][0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert runs[0][1] == "It is four.<|im_end|>"


def test_glm_turns_end_with_the_next_header_or_an_appended_eos():
  name = "zai-org/GLM-4.6"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "tools")
  assert [s for _, s in runs] == [
      "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
      "<arg_value>Paris</arg_value>\n</tool_call><|observation|>",
      "\n<think></think>\nIt is 21 degrees in Paris.<|endoftext|>"]
  assert encoded.appended_eos == 1


def test_command_r7b_supervises_the_response_start_and_not_the_next_header():
  name = "CohereForAI/c4ai-command-r7b-12-2024 (tool use)"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "system_multi")
  assert len(encoded.examples) == 1
  assert [s for _, s in runs] == [
      "<|START_RESPONSE|>I am fine, thank you.<|END_RESPONSE|>"
      "<|END_OF_TURN_TOKEN|>",
      "<|START_RESPONSE|>It is four.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]
  # The template always writes the next turn's header after a reply.
  assert all(c.endswith("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
             for c, _ in runs)
  ids, mask = encoded.examples[0]
  assert tok.decode(ids[len(mask) - 2:]) == (
      "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>") and not mask[-2:].any()


def test_deepseek_r1_prompts_with_think_and_keeps_every_record():
  name = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "system_multi")
  assert encoded.split and len(encoded.examples) == 2
  assert all(c.endswith("<｜Assistant｜><think>\n") for c, _ in runs)
  assert [s for _, s in runs] == ["I am fine, thank you.<｜end▁of▁sentence｜>",
                                  "It is four.<｜end▁of▁sentence｜>"]


def test_phi35_and_llama_tool_turns():
  name = "microsoft/Phi-3.5-mini-instruct"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "system_multi")
  # EOS written only after the final turn is not something the model says.
  assert [s for _, s in runs] == ["I am fine, thank you.<|end|>",
                                  "It is four.<|end|>"]
  ids, _ = encoded.examples[0]
  assert tok.decode(ids).endswith("It is four.<|end|>\n<|endoftext|>")
  name = "meta-llama/Llama-3.1-8B-Instruct"
  tok = rt.tokenizer(name)
  encoded, runs = _texts(tok, name, "tools")
  assert not encoded.split
  assert [s for _, s in runs] == [
      '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
      "It is 21 degrees in Paris.<|eot_id|>"]
  assert "<|start_header_id|>ipython<|end_header_id|>" in runs[1][0]


def test_a_conversation_opened_by_the_assistant():
  name = "meta-llama/Llama-3.1-8B-Instruct"
  tok = rt.tokenizer(name)
  t = rt.BY_NAME[name]
  messages = [{"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "What is two plus two?"},
              {"role": "assistant", "content": "It is four."}]
  encoded = render.Encoder(tok, t.text, "assistant").encode_all(
      Example("chat", messages=messages))
  assert [tok.decode(s) for _, s in _supervised(tok, encoded)] == [
      "Hello! How can I help?<|eot_id|>", "It is four.<|eot_id|>"]
