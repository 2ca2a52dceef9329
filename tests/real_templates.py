"""Real chat templates of popular models, with small tokenizers that speak them.

Each template in tests/chat_templates/ is the model's own (from its
tokenizer_config.json / chat_template.jinja), byte for byte as found at the
origin given here; tests/chat_templates/SOURCES.md says the same. A tokenizer
is a small byte-level BPE (tiny_tok) with that model's BOS / EOS names and
the template's special tokens added, so nothing is downloaded.

`eot` is the text the model must generate to end a reply (what the mask rule
supervises last); None where the template writes no end-of-turn token and the
next turn's first token (or an appended EOS) ends the reply.
"""

import dataclasses
import functools
import os
import re

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

import tiny_tok

DIR = os.path.join(os.path.dirname(__file__), "chat_templates")
_LLAMA_CPP = ("llama.cpp models/templates/ (ggml-org/llama.cpp, copied from "
              "the model's tokenizer_config.json by its "
              "scripts/get_chat_template.py), read at "
              "acproject/seq2seq_llama.cpp@13581144de0591776e4c6a85dabf35a90ce61c86")
_GORILLA = ("quoted as the model's tokenizer_config.json chat_template in "
            "ShishirPatil/gorilla berkeley-function-call-leaderboard/bfcl/"
            "model_handler/local_inference/phi.py@"
            "32b96c4bd301c11e57a8b0df29197cb18b90aabf")
_OLMO = ("chat_template of mauer4/Attention-From-Scratch weights/allenai/"
         "OLMo-2-1124-13B-Instruct/tokenizer_config.json@"
         "7b2eb9540b3955e12c8645aa55cb131d38223f01 (the model's own file)")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str  # model id
  file: str  # under tests/chat_templates/
  origin: str
  bos: str | None
  eos: str
  eot: str | None  # see the module docstring
  tools: bool = False  # renders tools / tool_calls / tool turns
  reasoning: bool = False  # renders reasoning_content
  system: bool = True  # accepts a system turn
  needs_tools: bool = False  # renders only with a tool list
  kwargs: tuple = ()  # chat_template_kwargs, as (key, value) pairs

  @property
  def text(self) -> str:
    with open(os.path.join(DIR, self.file), encoding="utf-8") as f:
      return f.read()


def _t(name, file, origin, bos, eos, eot, **kw):
  return Template(name, file, origin, bos, eos, eot, **kw)


TEMPLATES = [
    _t("meta-llama/Llama-3.1-8B-Instruct",
       "meta-llama-Llama-3.1-8B-Instruct.jinja", _LLAMA_CPP,
       "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", tools=True),
    _t("meta-llama/Llama-3.2-3B-Instruct",
       "meta-llama-Llama-3.2-3B-Instruct.jinja", _LLAMA_CPP,
       "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", tools=True),
    _t("meta-llama/Llama-3.3-70B-Instruct",
       "meta-llama-Llama-3.3-70B-Instruct.jinja", _LLAMA_CPP,
       "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", tools=True),
    _t("Qwen/Qwen2.5-7B-Instruct", "Qwen-Qwen2.5-7B-Instruct.jinja",
       _LLAMA_CPP, None, "<|im_end|>", "<|im_end|>", tools=True),
    _t("Qwen/Qwen3-0.6B", "Qwen-Qwen3-0.6B.jinja", _LLAMA_CPP, None,
       "<|im_end|>", "<|im_end|>", tools=True, reasoning=True),
    _t("Qwen/Qwen3-0.6B (enable_thinking=False)", "Qwen-Qwen3-0.6B.jinja",
       _LLAMA_CPP, None, "<|im_end|>", "<|im_end|>", tools=True,
       kwargs=(("enable_thinking", False),)),
    _t("Qwen/QwQ-32B", "Qwen-QwQ-32B.jinja", _LLAMA_CPP, None, "<|im_end|>",
       "<|im_end|>", tools=True),
    _t("deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
       "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", _LLAMA_CPP,
       "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
       "<｜end▁of▁sentence｜>"),
    _t("mistralai/Mistral-Nemo-Instruct-2407",
       "mistralai-Mistral-Nemo-Instruct-2407.jinja", _LLAMA_CPP, "<s>", "</s>",
       "</s>"),
    _t("mistralai/Mistral-Small-3.2-24B-Instruct-2506",
       "Mistral-Small-3.2-24B-Instruct-2506.jinja", _LLAMA_CPP, "<s>", "</s>",
       "</s>"),
    _t("google/gemma-2-2b-it", "google-gemma-2-2b-it.jinja", _LLAMA_CPP,
       "<bos>", "<eos>", "<end_of_turn>", system=False),
    _t("microsoft/Phi-3.5-mini-instruct",
       "microsoft-Phi-3.5-mini-instruct.jinja", _LLAMA_CPP, "<s>",
       "<|endoftext|>", "<|end|>"),
    _t("microsoft/phi-4", "microsoft-phi-4.jinja", _GORILLA, "<|endoftext|>",
       "<|im_end|>", "<|im_end|>"),
    _t("microsoft/Phi-4-mini-instruct", "microsoft-Phi-4-mini-instruct.jinja",
       _GORILLA, "<|endoftext|>", "<|endoftext|>", "<|end|>"),
    _t("HuggingFaceTB/SmolLM3-3B (llama.cpp's copy, edited by Unsloth)",
       "HuggingFaceTB-SmolLM3-3B.jinja", _LLAMA_CPP, None, "<|im_end|>",
       "<|im_end|>"),
    _t("ibm-granite/granite-3.3-2b-instruct",
       "ibm-granite-granite-3.3-2B-Instruct.jinja", _LLAMA_CPP,
       "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>"),
    _t("zai-org/GLM-4.6", "GLM-4.6.jinja", _LLAMA_CPP, None, "<|endoftext|>",
       None, tools=True, reasoning=True),
    _t("allenai/OLMo-2-1124-13B-Instruct",
       "allenai-OLMo-2-1124-13B-Instruct.jinja", _OLMO, "<|endoftext|>",
       "<|endoftext|>", "<|endoftext|>"),
    _t("CohereForAI/c4ai-command-r7b-12-2024 (tool use)",
       "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", _LLAMA_CPP,
       "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>",
       "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", tools=True),
    _t("CohereForAI/c4ai-command-r-plus (tool use)",
       "CohereForAI-c4ai-command-r-plus-tool_use.jinja", _LLAMA_CPP,
       "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
       tools=True, needs_tools=True),
]
BY_NAME = {t.name: t for t in TEMPLATES}

# Tokens a template writes that the model's tokenizer keeps whole.
_SPECIAL = re.compile(
    r"<\|[A-Za-z_0-9/]+\|>|<｜[^｜<>]+｜>|\[/?[A-Z_]+\]|<start_of_turn>|"
    r"<end_of_turn>|<sop>|</?think>|</?tool_call>")


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
  """A small BPE tokenizer with the model's BOS/EOS and template tokens."""
  t = BY_NAME[name]
  text = t.text
  specials = sorted(set(_SPECIAL.findall(text)) - {"[IMG]"})
  names = [s for s in (t.bos, t.eos) if s]
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(tiny_tok.CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>"] + list(dict.fromkeys(names)),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=t.bos, eos_token=t.eos,
      pad_token="<pad>", chat_template=text)
  extra = [s for s in specials if s not in names]
  if extra:
    fast.add_special_tokens({"additional_special_tokens": extra})
  return fast
