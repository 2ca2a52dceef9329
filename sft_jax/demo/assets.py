"""Builds the demo's inputs on disk: data files, a BPE tokenizer, a base model.

Everything is made locally from code and the chitchat-dataset package:

  <root>/data/general_{train,eval}.jsonl   {"text"} records (real human chat)
  <root>/data/domain_{train,eval}.jsonl    {"messages"} records (JSON task)
  <root>/base/                             HF Llama-shaped model (random init)
                                           + tokenizer files with the template

The base model starts random. The full demo fine-tunes it directly, with the
general chat mixed into SFT as the only source of English chat; sizes with
cpt_steps > 0 first continue pretraining on the general corpus.
"""

import dataclasses
import json
import os

from sft_jax.demo import corpus
from sft_jax.demo import task

# ChatML, the template Qwen uses; the reply closes with <|im_end|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class Size:
  """How big the demo is; "full" is the README's run, "tiny" the smoke test."""
  general_train: int  # chitchat conversations for training
  general_eval: int  # held-out chitchat conversations (general-data loss)
  domain_train: int  # generated task examples for SFT
  domain_eval: int  # held-out task examples (exact match, JSON validity)
  vocab_size: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int
  seq_len: int  # tokens per packed training row
  batch_size: int  # rows per step
  cpt_steps: int  # continued-pretraining steps (0: SFT starts from the base)
  sft_steps: int  # SFT steps per sweep point
  eval_every: int  # steps between evaluations (at the end too)
  max_new_tokens: int  # generation budget of a held-out answer
  max_chars: int  # general-corpus chunk length in characters
  shares: tuple[float, ...]  # swept share of general data in SFT


SIZES = {
    "full": Size(general_train=400, general_eval=20, domain_train=2500,
                 domain_eval=64, vocab_size=2048, hidden=128, layers=4,
                 heads=4, kv_heads=2, mlp=256, seq_len=256, batch_size=4,
                 cpt_steps=0, sft_steps=400, eval_every=100,
                 max_new_tokens=48, max_chars=450, shares=(0.0, 0.25, 0.5)),
    "tiny": Size(general_train=40, general_eval=4, domain_train=200,
                 domain_eval=8, vocab_size=400, hidden=32, layers=2, heads=2,
                 kv_heads=1, mlp=64, seq_len=128, batch_size=4, cpt_steps=4,
                 sft_steps=4, eval_every=2, max_new_tokens=16, max_chars=200,
                 shares=(0.0, 0.5)),
}


def _write_jsonl(path: str, records) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def data_paths(root: str) -> dict[str, str]:
  d = os.path.join(root, "data")
  return {name: os.path.join(d, f"{name}.jsonl") for name in (
      "general_train", "general_eval", "domain_train", "domain_eval")}


def build_data(root: str, size: Size, seed: int = 0) -> dict[str, str]:
  """Writes the four JSONL files (skipped when present); returns their paths."""
  paths = data_paths(root)
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(os.path.dirname(paths["general_train"]), exist_ok=True)
  general_train, general_eval = corpus.make_splits(
      size.general_train, size.general_eval, max_chars=size.max_chars,
      seed=seed)
  domain_train, domain_eval = task.make_splits(
      size.domain_train, size.domain_eval, seed=seed)
  for name, records in (("general_train", general_train),
                        ("general_eval", general_eval),
                        ("domain_train", domain_train),
                        ("domain_eval", domain_eval)):
    _write_jsonl(paths[name], records)
  return paths


def build_tokenizer(paths: dict[str, str], vocab_size: int):
  """A byte-level BPE trained on both training corpora, with the template."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  def texts():
    for name in ("general_train", "domain_train"):
      with open(paths[name], encoding="utf-8") as f:
        for line in f:
          r = json.loads(line)
          if "text" in r:
            yield r["text"]
          else:
            for m in r["messages"]:
              yield m["content"]

  tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
  # Spaces are tokens of their own, so a word is the same token in the
  # sentence and inside the JSON reply ("Aisha", not " Aisha" vs "Aisha"):
  # the task becomes copying, which a small model learns in a few minutes.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(" ", "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts(), trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
      chat_template=CHAT_TEMPLATE)


def hf_config(size: Size, vocab_size: int) -> dict:
  """The base model's HF config.json: a small Llama."""
  return {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": vocab_size, "hidden_size": size.hidden,
      "intermediate_size": size.mlp, "num_hidden_layers": size.layers,
      "num_attention_heads": size.heads,
      "num_key_value_heads": size.kv_heads,
      "head_dim": size.hidden // size.heads,
      "max_position_embeddings": 2 * size.seq_len, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": True,
      "hidden_act": "silu", "attention_bias": False,
      "torch_dtype": "float32",
  }


def build_base_model(root: str, size: Size, paths: dict[str, str],
                     seed: int = 0) -> str:
  """Tokenizer + randomly initialised HF model in <root>/base; returns it."""
  base = os.path.join(root, "base")
  if os.path.exists(os.path.join(base, "config.json")):
    return base
  import jax  # pylint: disable=g-import-not-at-top
  from sft_jax import models  # pylint: disable=g-import-not-at-top

  tokenizer = build_tokenizer(paths, size.vocab_size)
  tmp = base + ".tmp"
  tokenizer.save_pretrained(tmp)
  cfg = models.ModelConfig.from_hf_config(hf_config(size, len(tokenizer)))
  variables = models.init(cfg, jax.random.key(seed))
  # Weights ~ N(0, 1/hidden) rather than the library's N(0, 0.02): with
  # 0.02 this 128-wide model sits for hundreds of steps on a plateau where
  # it predicts the commonest answer and never learns to copy a value from
  # the sentence; at 1/sqrt(hidden) it learns the copying within the budget.
  std = size.hidden ** -0.5

  def rescale(path, x):
    name = jax.tree_util.keystr(path)
    return x * (std / 0.02) if "kernel" in name or "embedding" in name else x

  params = jax.tree_util.tree_map_with_path(rescale, variables["params"])
  models.save_hf(cfg, params, tmp, dtype="float32")
  os.replace(tmp, base)
  return base
