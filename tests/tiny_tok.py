"""A small byte-level BPE tokenizer trained offline, with a chat template.

Besides the default ChatML template, real-world-style templates of the main
families are given, each plain (as nearly every released template is) and with
`{% generation %}` markers: ChatML (Qwen), Llama-3 headers, Mistral [INST],
Gemma turns. TEMPLATES maps a name to (template, end-of-turn text).
"""

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHATML_GEN = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama 3: BOS in the template, headers, content trimmed, <|eot_id|> closes.
_LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}{GEN}"
    "{{ m['content'] | trim + '<|eot_id|>' }}{ENDGEN}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Mistral: system folded into the first user turn; roles must alternate.
_MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ bos_token }}"
    "{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' }}{GEN}{{ m['content'] + eos_token }}{ENDGEN}{% endif %}"
    "{% endfor %}")

# Gemma: "model" role, system folded into the first user turn.
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}{GEN}"
    "{{ m['content'] | trim + '<end_of_turn>' }}{ENDGEN}{{ '\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>user\n' + (prefix if loop.first else '') "
    "+ m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


# Qwen 2.5: ChatML with a default system prompt injected when none is given.
QWEN25 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] != 'system' or not loop.first %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _markers(template: str, on: bool) -> str:
  gen, end = ("{% generation %}", "{% endgeneration %}") if on else ("", "")
  return template.replace("{GEN}", gen).replace("{ENDGEN}", end)


LLAMA3, LLAMA3_GEN = _markers(_LLAMA3, False), _markers(_LLAMA3, True)
MISTRAL, MISTRAL_GEN = _markers(_MISTRAL, False), _markers(_MISTRAL, True)
GEMMA, GEMMA_GEN = _markers(_GEMMA, False), _markers(_GEMMA, True)

# name -> (template, the text that closes an assistant reply)
TEMPLATES = {
    "chatml": (CHATML, "<|im_end|>"), "chatml_gen": (CHATML_GEN, "<|im_end|>"),
    "qwen25": (QWEN25, "<|im_end|>"),
    "llama3": (LLAMA3, "<|eot_id|>"), "llama3_gen": (LLAMA3_GEN, "<|eot_id|>"),
    "mistral": (MISTRAL, "</s>"), "mistral_gen": (MISTRAL_GEN, "</s>"),
    "gemma": (GEMMA, "<end_of_turn>"), "gemma_gen": (GEMMA_GEN, "<end_of_turn>"),
}

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Added (after the trained vocabulary) only when a template uses them, so the
# default tokenizer's ids never change.
EXTRA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "Answer with a JSON object: {\"name\": \"value\", \"count\": 3}.",
    "user assistant system: what is two plus two? It is four.",
    "Packing several short examples into one row saves compute.",
] * 20


def make_tokenizer(path=None, *, vocab_size: int = 300, chat_template=CHATML,
                   add_bos: bool = True):
  """Trains a byte-level BPE; returns a PreTrainedTokenizerFast (saved if path)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if add_bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B",
        special_tokens=[("<s>", tok.token_to_id("<s>"))])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>", chat_template=chat_template)
  extra = [t for t in EXTRA_SPECIALS if chat_template and t in chat_template]
  if extra:
    fast.add_special_tokens({"additional_special_tokens": extra})
  if path is not None:
    fast.save_pretrained(str(path))
  return fast
