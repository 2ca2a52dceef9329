"""Tiny random Hugging Face checkpoints for every supported family.

`make_tiny_hf(family, path)` builds the model with `transformers` (PyTorch CPU),
re-initialises weights with a large enough scale that a missing window,
soft-cap or scaling changes the logits visibly, and `save_pretrained`s it.
"""

import torch
import transformers

# Shared small shape: GQA 4:2, head_dim != hidden / heads.
_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6)

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3")
# Also built by make_tiny_hf, not a text-only family: "gemma3_mm".


def hf_config(family: str, **overrides):
  """The transformers config of a tiny model of `family`."""
  kw = dict(_BASE)
  if family == "llama":
    cls = transformers.LlamaConfig
    kw.update(tie_word_embeddings=False, attention_bias=True)
  elif family == "llama3":
    cls = transformers.LlamaConfig
    kw.update(tie_word_embeddings=True, rope_theta=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0,
                                low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=16))
  elif family == "mistral":
    cls = transformers.MistralConfig
    kw.update(sliding_window=5, tie_word_embeddings=False)
  elif family == "qwen2":
    cls = transformers.Qwen2Config
    kw.update(tie_word_embeddings=False)
  elif family == "qwen3":
    cls = transformers.Qwen3Config
    kw.update(tie_word_embeddings=True)
  elif family == "gemma":
    cls = transformers.GemmaConfig
    kw.update(hidden_act="gelu_pytorch_tanh",
              hidden_activation="gelu_pytorch_tanh")
  elif family == "gemma2":
    cls = transformers.Gemma2Config
    kw.update(sliding_window=5, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, query_pre_attn_scalar=24,
              hidden_activation="gelu_pytorch_tanh")
  elif family == "gemma3":
    cls = transformers.Gemma3TextConfig
    kw.update(sliding_window=5, query_pre_attn_scalar=24,
              rope_local_base_freq=100.0, rope_theta=10000.0,
              num_hidden_layers=4, sliding_window_pattern=2,
              hidden_activation="gelu_pytorch_tanh")
  elif family == "gemma3_mm":  # image-text Gemma 3; its text model is tested
    text = hf_config("gemma3", **overrides).to_dict()
    return transformers.Gemma3Config(
        text_config=text, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
  else:
    raise ValueError(f"unknown family {family!r}")
  kw.update(overrides)
  return cls(**kw)


def make_tiny_hf(family: str, path, *, dtype: str = "float32",
                 max_shard_size=None, seed: int = 0, init_std: float = 0.2,
                 **overrides) -> str:
  """Builds, re-initialises and saves a tiny `family` model; returns `path`."""
  torch.manual_seed(seed)
  config = hf_config(family, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        # Norm weights around 1 (Gemma stores w with the +1 applied at run
        # time, so around 0 there): perturbed so a wrong convention shows.
        p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in family else 1))
      else:
        p.copy_(torch.randn_like(p) * init_std)
  model = model.to(getattr(torch, dtype))
  kwargs = {"safe_serialization": True}
  if max_shard_size is not None:
    kwargs["max_shard_size"] = max_shard_size
  model.save_pretrained(str(path), **kwargs)
  return str(path)


def load_hf(path, dtype=torch.float32):
  """Loads a saved checkpoint back with transformers, eager attention."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=dtype, attn_implementation="eager")
  return model.eval()
