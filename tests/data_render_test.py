"""Assistant masks from prefix rendering, across real-world-style templates."""

import numpy as np
import pytest

import tiny_tok
from sft_jax.data import render
from sft_jax.data.errors import RecordError
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


def test_markers_that_disagree_are_reported_and_the_rule_wins():
  # SmolLM3-style markers that take in the assistant header, and markers that
  # leave the end-of-turn token out: both readings are reported, the rule's
  # mask is the one used (the same as with no markers at all).
  header = tiny_tok.CHATML_GEN.replace(
      "{{ '<|im_start|>' + m['role'] + '\n' }}\n", "").replace(
      "{{ '<|im_start|>' + m['role'] + '\n' }}"
      "{% if m['role'] == 'assistant' %}{% generation %}",
      "{% if m['role'] == 'assistant' %}{% generation %}"
      "{{ '<|im_start|>assistant\n' }}").replace(
      "{% else %}{{ m['content']", "{% else %}{{ '<|im_start|>' + m['role'] "
      "+ '\n' }}{{ m['content']")
  short = tiny_tok.CHATML_GEN.replace(
      "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
      "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
  plain = tiny_tok.make_tokenizer()
  want = render.Encoder(plain, tiny_tok.CHATML, "assistant").encode(
      Example("chat", messages=CHATS["system_multi"]))
  for bad, token, marked in ((header, "<|im_start|>", "supervised"),
                             (short, "<|im_end|>", "context")):
    tok = tiny_tok.make_tokenizer(chat_template=bad)
    assert tok.apply_chat_template(CHATS["system_multi"], tokenize=False) == (
        plain.apply_chat_template(CHATS["system_multi"], tokenize=False))
    got = render.Encoder(tok, bad, "assistant").encode_all(
        Example("chat", messages=CHATS["system_multi"]))
    assert got.markers.startswith(
        f"token {_first_diff(tok, got, token)} ({token!r}): generation "
        f"markers say {marked}, the rule says "
        f"{'context' if marked == 'supervised' else 'supervised'}")
    np.testing.assert_array_equal(got.examples[0][0], want[0])
    np.testing.assert_array_equal(got.examples[0][1], want[1])
  # Markers that agree are checked and say so.
  tok = tiny_tok.make_tokenizer(chat_template=tiny_tok.CHATML_GEN)
  assert render.Encoder(tok, tok.chat_template, "assistant").encode_all(
      Example("chat", messages=CHATS["system_multi"])).markers == ""


def _first_diff(tok, got, token):
  """Index of the first `token` in the first assistant turn's region."""
  ids = got.examples[0][0].tolist()
  tid = tok.convert_tokens_to_ids(token)
  sup = np.flatnonzero(got.examples[0][1])
  if token == "<|im_start|>":  # the header just before the first reply
    return max(i for i, x in enumerate(ids[:sup[0]]) if x == tid)
  return ids.index(tid, int(sup[0]))


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


def test_template_that_rewrites_history_splits_the_conversation():
  # Marks the final turn differently, so earlier renderings are rewritten.
  shifty = tiny_tok.CHATML.replace(
      "{{ '<|im_start|>' + m['role']",
      "{{ ('FINAL ' if loop.last else '') + '<|im_start|>' + m['role']")
  tok = tiny_tok.make_tokenizer(chat_template=shifty)
  chat = CHATS["system_multi"]
  got = render.Encoder(tok, shifty, "assistant").encode_all(
      Example("chat", messages=chat))
  assert got.split and len(got.examples) == 2
  for (ids, mask), k in zip(got.examples, (2, 4)):
    # Each example is the turn's generation-time context, then the turn.
    prompt = tok.apply_chat_template(chat[:k], add_generation_prompt=True,
                                     tokenize=False)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(ids[:n]) == prompt and not mask[:n].any()
    assert tok.decode(ids[n:]) == chat[k]["content"] + "<|im_end|>"
    assert mask[n:].all()
  with pytest.raises(ValueError, match="makes 2 examples"):
    render.Encoder(tok, shifty, "assistant").encode(
        Example("chat", messages=chat))
  # history="full": one sequence; the earlier reply where the full rendering
  # has it.
  got = render.Encoder(tok, shifty, "assistant", history="full").encode_all(
      Example("chat", messages=chat))
  assert not got.split and len(got.examples) == 1
  ids, mask = got.examples[0]
  assert ids.tolist() == tok.apply_chat_template(chat, return_dict=False)
  assert tok.decode(ids[mask > 0]) == (
      "I am fine, thank you.<|im_end|>It is four.<|im_end|>")


def test_markers_are_checked_on_the_turns_a_split_conversation_keeps():
  # Earlier replies are rewritten ("old: ..."), so turn 1 gets its own
  # example; the markers are compared on the full rendering's stable turn.
  rewrites = tiny_tok.CHATML_GEN.replace(
      "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
      "{% generation %}{{ ('' if loop.last else 'old: ') + m['content'] + "
      "'<|im_end|>' }}{% endgeneration %}")
  tok = tiny_tok.make_tokenizer(chat_template=rewrites)
  chat = CHATS["system_multi"]
  got = render.Encoder(tok, rewrites, "assistant").encode_all(
      Example("chat", messages=chat))
  assert got.split and len(got.examples) == 2 and got.markers == ""
  got = render.Encoder(tok, rewrites, "assistant", history="full").encode_all(
      Example("chat", messages=chat))
  assert len(got.examples) == 1 and got.markers == ""
  ids, mask = got.examples[0]
  assert tok.decode(ids[mask > 0]) == (
      "old: I am fine, thank you.<|im_end|>It is four.<|im_end|>")
