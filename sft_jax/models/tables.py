"""HF tensor name <-> params path, one declarative table per family.

A row is (HF name pattern, params path, transform). "{L}" in a pattern is
the layer index; those rows fill one slice of a leaf stacked over layers.
Transform "T" transposes (torch Linear stores [out, in], our kernels are
[in, out]); "" copies. A table lists every tensor the family may have; the
loader expects exactly the rows whose params path exists for the config
(biases, q/k norms, lm_head only when the config has them).
"""

import re

_LAYER = "model.layers.{L}."

_COMMON = (
    ("model.embed_tokens.weight", "embedder/embedding", ""),
    ("model.norm.weight", "final_norm/scale", ""),
    ("lm_head.weight", "lm_head/kernel", "T"),
    (_LAYER + "input_layernorm.weight", "layers/input_norm/scale", ""),
) + tuple(
    row for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for row in (
        (_LAYER + f"self_attn.{proj}.weight", f"layers/attn/{proj}/kernel",
         "T"),
        (_LAYER + f"self_attn.{proj}.bias", f"layers/attn/{proj}/bias", ""),
    )
) + tuple(
    row for proj in ("gate_proj", "up_proj", "down_proj") for row in (
        (_LAYER + f"mlp.{proj}.weight", f"layers/mlp/{proj}/kernel", "T"),
        (_LAYER + f"mlp.{proj}.bias", f"layers/mlp/{proj}/bias", ""),
    )
)

_QK_NORM = (
    (_LAYER + "self_attn.q_norm.weight", "layers/attn/q_norm/scale", ""),
    (_LAYER + "self_attn.k_norm.weight", "layers/attn/k_norm/scale", ""),
)

# Llama's "post_attention_layernorm" is the norm *before* the MLP.
_PRE_NORM = (
    (_LAYER + "post_attention_layernorm.weight", "layers/pre_mlp_norm/scale",
     ""),
)

# Gemma 2/3 norm both sides of attention and of the MLP.
_SANDWICH = (
    (_LAYER + "post_attention_layernorm.weight", "layers/post_attn_norm/scale",
     ""),
    (_LAYER + "pre_feedforward_layernorm.weight", "layers/pre_mlp_norm/scale",
     ""),
    (_LAYER + "post_feedforward_layernorm.weight",
     "layers/post_mlp_norm/scale", ""),
)

TABLES = {
    "llama": _COMMON + _PRE_NORM,
    "mistral": _COMMON + _PRE_NORM,
    "qwen2": _COMMON + _PRE_NORM,
    "qwen3": _COMMON + _PRE_NORM + _QK_NORM,
    "gemma": _COMMON + _PRE_NORM,
    "gemma2": _COMMON + _SANDWICH,
    "gemma3_text": _COMMON + _SANDWICH + _QK_NORM,
}

# Tensors some checkpoints carry that the model recomputes or ties.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# Image-text checkpoints: where their language model's tensors live
# (prefix renames) and what else they hold (skipped).
_WRAPPERS = {
    "gemma3": dict(renames=(("model.", "language_model.model."),
                            ("lm_head.", "language_model.lm_head.")),
                   skipped=r"(vision_tower|multi_modal_projector)\..*"),
}


class Table:
  """A family's rows, matched by regex in one direction, formatted in the
  other."""

  def __init__(self, model_type: str, wrapper: str = ""):
    self.rows = TABLES[model_type]
    self.skipped = None
    if wrapper:
      renames = _WRAPPERS[wrapper]["renames"]
      self.skipped = re.compile(_WRAPPERS[wrapper]["skipped"])
      self.rows = tuple(
          (next(new + pattern[len(old):] for old, new in renames
                if pattern.startswith(old)), path, transform)
          for pattern, path, transform in self.rows)
    self._regexes = [
        re.compile(re.escape(pattern).replace(re.escape("{L}"), r"(\d+)")
                   + "$")
        for pattern, _, _ in self.rows]

  def ignored(self, hf_name: str) -> bool:
    """Tensors the loader skips: recomputed buffers, other modalities."""
    return bool(IGNORED.match(hf_name) or (
        self.skipped and self.skipped.fullmatch(hf_name)))

  def match(self, hf_name: str):
    """(params path, layer index or None, transform), or None if no row."""
    for regex, (_, path, transform) in zip(self._regexes, self.rows):
      m = regex.match(hf_name)
      if m:
        return path, (int(m.group(1)) if m.groups() else None), transform
    return None

  def hf_names(self, path: str, num_layers: int):
    """[(HF name, layer index or None)] for a params path, and transform."""
    for pattern, row_path, transform in self.rows:
      if row_path == path:
        if "{L}" in pattern:
          return [(pattern.replace("{L}", str(i)), i)
                  for i in range(num_layers)], transform
        return [(pattern, None)], transform
    raise KeyError(f"no HF tensor row for params path {path}")


def hf_module_name(path: str, layer: int, model_type: str = "llama") -> str:
  """HF module name of a LoRA-able kernel: ("layers/attn/q_proj", 3) ->
  "model.layers.3.self_attn.q_proj". The HF weight is kernel[layer].T."""
  names, _ = Table(model_type).hf_names(path + "/kernel", layer + 1)
  return names[layer][0][: -len(".weight")]
