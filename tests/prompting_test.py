"""Prompts are what training saw, stop ids are the template's end of turn,
evaluation records split into prompt and reference as training rendered
them."""

import pytest

import tiny_tok
from sft_jax.data import render
from sft_jax.data.formats import Example
from sft_jax.infer import prompting

GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
    "m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_EXTRA = ["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>",
          "<|end_header_id|>", "<|eot_id|>"]


def _tok(template, add_bos=True):
  tok = tiny_tok.make_tokenizer(chat_template=template, add_bos=add_bos)
  tok.add_special_tokens({"additional_special_tokens": _EXTRA})
  return tok


@pytest.mark.parametrize("template,eot", [
    (tiny_tok.CHATML, "<|im_end|>"), (GEMMA, "<end_of_turn>"),
    (LLAMA3, "<|eot_id|>")])
def test_stop_ids_are_eos_and_the_end_of_turn(template, eot):
  tok = _tok(template, add_bos=False)
  assert prompting.end_of_turn_id(tok) == tok.convert_tokens_to_ids(eot)
  assert prompting.stop_ids(tok, extra=[7]) == sorted(
      {tok.eos_token_id, tok.convert_tokens_to_ids(eot), 7})


def test_no_template_no_end_of_turn():
  tok = tiny_tok.make_tokenizer(chat_template=None)
  assert prompting.end_of_turn_id(tok) is None
  assert prompting.stop_ids(tok) == [tok.eos_token_id]
  with pytest.raises(ValueError, match="no chat template"):
    prompting.encode_prompt(tok, "hi")


@pytest.mark.parametrize("template", [tiny_tok.CHATML, GEMMA, LLAMA3])
def test_prompt_is_a_prefix_of_the_training_tokens(template):
  # Templates that write BOS themselves get a tokenizer that does not add
  # one, as real Gemma / Llama 3 tokenizers behave under templating.
  tok = _tok(template, add_bos=template == tiny_tok.CHATML)
  messages = [{"role": "user", "content": "what is two plus two?"},
              {"role": "assistant", "content": "It is four."},
              {"role": "user", "content": "Hello, how are you?"},
              {"role": "assistant", "content": "I am fine, thank you."}]
  train_ids, mask = render.Encoder(tok, template, "assistant").encode(
      Example("chat", messages=messages))
  prompt = prompting.encode_prompt(tok, messages[:-1])
  assert list(train_ids[:len(prompt)]) == prompt
  # The reply starts right where the prompt ends.
  assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


def test_raw_prompt_gets_the_tokenizer_bos():
  tok = tiny_tok.make_tokenizer()
  assert prompting.encode_prompt(tok, "Hello", raw=True) == tok(
      "Hello").input_ids
  assert prompting.encode_prompt(tok, "Hello", raw=True)[0] == (
      tok.bos_token_id)


def test_split_record_formats():
  chat = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}
  assert prompting.split_record(chat, "f:1") == (
      chat["messages"][:2], "Hello", False)
  pc = {"prompt": "2+2=", "completion": "4"}
  assert prompting.split_record(pc, "f:2") == (
      [{"role": "user", "content": "2+2="}], "4", False)
  assert prompting.split_record(pc, "f:2", prompt_as_user_turn=False) == (
      "2+2=", "4", True)
  alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4"}
  assert prompting.split_record(alpaca, "f:3") == (
      [{"role": "user", "content": "Add\n\n2 and 2"}], "4", False)
  with pytest.raises(ValueError, match="f:4: .*reference"):
    prompting.split_record({"text": "just text"}, "f:4")
  with pytest.raises(ValueError, match="f:5: turns follow"):
    prompting.split_record({"messages": chat["messages"] + [
        {"role": "user", "content": "and?"}]}, "f:5")


def test_read_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"prompt": "a"}\n\n[1, 2]\n')
  with pytest.raises(ValueError, match=f"{path}:3: expected a JSON object"):
    prompting.read_jsonl(str(path))
  path.write_text('{"prompt": "a"}\n{"prompt": \n')
  with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
    prompting.read_jsonl(str(path))


def test_inference_prompts_are_the_trained_contexts_on_real_templates():
  # Every supervised turn, split or not, follows exactly the ids generation
  # starts from, with the same template kwargs (Qwen3 rewrites history, GLM
  # ends turns with the next header, DeepSeek-R1 prompts with <think>).
  import real_templates  # pylint: disable=g-import-not-at-top
  messages = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "what is two plus two?"},
              {"role": "assistant", "content": "It is four.",
               "reasoning_content": "Two and two."},
              {"role": "user", "content": "Hello, how are you?"},
              {"role": "assistant", "content": "I am fine, thank you."}]
  for name, kwargs in (("Qwen/Qwen3-0.6B", {}),
                       ("Qwen/Qwen3-0.6B", {"enable_thinking": False}),
                       ("zai-org/GLM-4.6", {}),
                       ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", {}),
                       ("meta-llama/Llama-3.1-8B-Instruct", {})):
    tok = real_templates.tokenizer(name)
    enc = render.Encoder(tok, tok.chat_template, "assistant",
                         template_kwargs=kwargs)
    examples = enc.encode_all(Example("chat", messages=messages)).examples
    for k in (2, 4):
      prompt = prompting.encode_prompt(tok, messages[:k],
                                       template_kwargs=kwargs)
      starts = [(ids, mask) for ids, mask in examples
                if list(ids[:len(prompt)]) == prompt and
                mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0]
      assert len(starts) == 1, (name, kwargs, k)


def test_template_kwargs_of_a_run(tmp_path):
  from sft_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  c = data_config.default_config()
  c.sources.a = data_config.source_config(
      path="a.jsonl", chat_template_kwargs={"enable_thinking": False})
  (tmp_path / "config.json").write_text(json.dumps(
      {"data": json.loads(c.to_json())}))
  assert prompting.template_kwargs_of_run(str(tmp_path)) == {
      "enable_thinking": False}
  c.sources.b = data_config.source_config(path="b.jsonl")
  assert prompting.template_kwargs_of_data(c.to_dict()) == {}


def test_tool_conversation_prompt_matches_training():
  # A generation request for the turn after a tool result: tools, the call
  # and its result rendered as training rendered them.
  import json  # pylint: disable=g-import-not-at-top
  import real_templates  # pylint: disable=g-import-not-at-top
  from sft_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from sft_jax.data import formats  # pylint: disable=g-import-not-at-top
  tool = {"type": "function", "function": {
      "name": "get_weather", "description": "Weather of a city",
      "parameters": {"type": "object", "properties": {
          "city": {"type": "string", "description": "The city"}}}}}
  turns = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"function": {"name": "get_weather",
                             "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "content": '{"celsius": 21}'}]
  request = {"tools": json.dumps([tool]), "messages": turns}
  trained = {"tools": [tool], "messages": turns + [
      {"role": "assistant", "content": "It is 21 degrees."}]}
  tok = real_templates.tokenizer("Qwen/Qwen2.5-7B-Instruct")
  prompt = prompting.encode_prompt(
      tok, prompting.prompt_of_record(request, "r:1", raw=False),
      tools=prompting.tools_of_record(request, "r:1"))
  fields = data_config.fields_config()
  ids, mask = render.Encoder(tok, tok.chat_template, "last").encode(
      formats.to_example(trained, "messages", fields))
  assert list(ids[:len(prompt)]) == prompt and "<tools>" in tok.decode(prompt)
  assert mask[len(prompt)] == 1 and not mask[:len(prompt)].any()
