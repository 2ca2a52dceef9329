"""Assistant masks from prefix rendering, across real-world-style templates."""

import numpy as np
import pytest

import tiny_tok
from sft_jax.data import render
from sft_jax.data.errors import DataError, RecordError
from sft_jax.data.formats import Example

CHATS = {
    "single": [{"role": "user", "content": "What is two plus two?"},
               {"role": "assistant", "content": "It is four."}],
    "system_multi": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."}],
    # The reply repeats the user's words: a mask found by searching the
    # rendered text for the reply would land in the user turn.
    "echo": [{"role": "user", "content": "the quick brown fox"},
             {"role": "assistant", "content": "the quick brown fox"},
             {"role": "user", "content": "the quick brown fox"},
             {"role": "assistant", "content": "the quick brown fox"}],
}


@pytest.fixture(scope="module", params=sorted(tiny_tok.TEMPLATES))
def template_tok(request):
  template, eot = tiny_tok.TEMPLATES[request.param]
  return request.param, tiny_tok.make_tokenizer(chat_template=template), eot


def _runs(mask):
  """[start, end) of each run of ones."""
  padded = np.concatenate([[0], mask.astype(int), [0]])
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("policy", ["assistant", "last"])
def test_supervised_spans_are_replies_plus_end_of_turn(template_tok, chat,
                                                       policy):
  name, tok, eot = template_tok
  messages = CHATS[chat]
  enc = render.Encoder(tok, tok.chat_template, policy)
  ids, mask = enc.encode(Example("chat", messages=messages))
  # The ids are exactly the template's own tokenization.
  assert ids.tolist() == tok.apply_chat_template(messages, tokenize=True,
                                                 return_dict=False)
  got = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
  want = [m["content"] + eot for m in messages if m["role"] == "assistant"]
  if policy == "last":
    want = want[-1:]
  if name.startswith("mistral"):
    # "[/INST] reply": byte-level BPE attaches the space to the reply's first
    # word, so that token (which the model must produce) is supervised.
    assert all(g.startswith(" ") for g in got)
    got = [g[1:] for g in got]
  assert got == want


def test_all_policy_supervises_every_token(template_tok):
  _, tok, _ = template_tok
  ids, mask = render.Encoder(tok, tok.chat_template, "all").encode(
      Example("chat", messages=CHATS["system_multi"]))
  assert mask.sum() == len(ids)


def test_no_double_bos(template_tok):
  name, tok, _ = template_tok
  ids, _ = render.Encoder(tok, tok.chat_template, "assistant").encode(
      Example("chat", messages=CHATS["single"]))
  n_bos = int((ids == tok.bos_token_id).sum())
  # The tokenizer itself adds BOS (post-processor); the chat templates that
  # write BOS must not get a second one.
  assert tok("x")["input_ids"][0] == tok.bos_token_id
  assert n_bos == (0 if name.startswith(("chatml", "qwen")) else 1)
  if n_bos:
    assert ids[0] == tok.bos_token_id


def test_markers_disagreeing_with_prefix_rendering_fail_loudly():
  # The markers leave the end-of-turn token out of the reply.
  bad = tiny_tok.CHATML_GEN.replace(
      "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
      "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
  tok = tiny_tok.make_tokenizer(chat_template=bad)
  with pytest.raises(DataError, match="generation.*disagree"):
    render.Encoder(tok, bad, "assistant").encode(
        Example("chat", messages=CHATS["single"]))


def test_template_refusing_input_is_a_record_error():
  tok = tiny_tok.make_tokenizer(chat_template=tiny_tok.MISTRAL)
  two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
               {"role": "assistant", "content": "c"}]
  with pytest.raises(RecordError, match="alternate") as e:
    render.Encoder(tok, tok.chat_template, "assistant").encode(
        Example("chat", messages=two_users))
  assert e.value.reason == "template_error"


def test_text_and_prompt_completion():
  tok = tiny_tok.make_tokenizer()
  enc = render.Encoder(tok, tok.chat_template, "assistant",
                       prompt_as_user_turn=False)
  ids, mask = enc.encode(Example("text", text="The quick brown fox."))
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  assert (ids == tok.bos_token_id).sum() == 1 and mask.all()
  ids, mask = enc.encode(Example("prompt_completion", prompt="Q: two plus two?",
                                 completion=" It is four."))
  assert tok.decode(ids[mask.astype(bool)]) == " It is four.</s>"
  assert tok.decode(ids) == "<s>Q: two plus two? It is four.</s>"
  # With a template, the prompt is a user turn and the completion the reply.
  enc = render.Encoder(tok, tok.chat_template, "assistant")
  ids, mask = enc.encode(Example("prompt_completion", prompt="two plus two?",
                                 completion="four"))
  assert tok.decode(ids[mask.astype(bool)]) == "four<|im_end|>"
  assert tok.decode(ids).startswith("<|im_start|>user\ntwo plus two?")


def test_reply_without_content_match_still_masks_the_reply():
  # Llama 3 trims content: "  padded  " renders as "padded".
  tok = tiny_tok.make_tokenizer(chat_template=tiny_tok.LLAMA3)
  ids, mask = render.Encoder(tok, tok.chat_template, "assistant").encode(
      Example("chat", messages=[{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "  padded  "}]))
  assert tok.decode(ids[mask.astype(bool)]) == "padded<|eot_id|>"


def test_no_supervised_tokens_is_reported():
  tok = tiny_tok.make_tokenizer()
  # A template that renders no reply at all leaves nothing to learn.
  drop = tiny_tok.CHATML.replace(
      "{% for m in messages %}",
      "{% for m in messages if m['role'] != 'assistant' %}").split(
          "{% if add_generation_prompt %}")[0]
  with pytest.raises(RecordError) as e:
    render.Encoder(tok, drop, "assistant").encode(
        Example("chat", messages=CHATS["single"]))
  assert e.value.reason == "no_supervised_tokens"


def test_masks_do_not_depend_on_trimmed_offsets():
  import tokenizers  # pylint: disable=g-import-not-at-top
  chat = [{"role": "user", "content": "Hello  there\n\nyou"},
          {"role": "assistant", "content": "It  is\n\n four .  "}]
  masks = []
  for trim in (False, True):
    tok = tiny_tok.make_tokenizer(add_bos=False)
    tok.backend_tokenizer.post_processor = tokenizers.processors.ByteLevel(
        trim_offsets=trim)
    ids, mask = render.Encoder(tok, tok.chat_template, "assistant").encode(
        Example("chat", messages=chat))
    assert tok.decode(ids[mask > 0]) == chat[1]["content"] + "<|im_end|>"
    masks.append(mask.tolist())
  assert masks[0] == masks[1]


def test_template_that_is_not_prefix_stable_is_a_record_error():
  # Marks the final turn differently, so earlier renderings are rewritten.
  shifty = tiny_tok.CHATML.replace(
      "{{ '<|im_start|>' + m['role']",
      "{{ ('FINAL ' if loop.last else '') + '<|im_start|>' + m['role']")
  tok = tiny_tok.make_tokenizer(chat_template=shifty)
  with pytest.raises(RecordError) as e:
    render.Encoder(tok, shifty, "assistant").encode(
        Example("chat", messages=CHATS["system_multi"]))
  assert e.value.reason == "template_not_prefix_stable"
