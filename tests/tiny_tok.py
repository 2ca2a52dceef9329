"""A small byte-level BPE tokenizer trained offline, with a chat template.

Other tests extend it with further templates; this file gives the common one.
"""

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

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
  if path is not None:
    fast.save_pretrained(str(path))
  return fast
