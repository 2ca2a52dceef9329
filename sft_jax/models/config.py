"""Model configuration: one frozen dataclass driven by a HF `config.json`.

Dimension letters used in shape-suffixed names across `sft_jax.models`:
  B batch, T query length, S key/value length (cache slots), D hidden size,
  H query heads, N key/value heads, G = H // N (query heads per kv head),
  K head dim, F MLP hidden size, V vocabulary, L layers, R LoRA rank.
"""

import dataclasses
import json
from typing import Any

import numpy as np

from sft_jax.models.errors import UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"

# HF `model_type` -> family traits that config.json does not spell out.
_FAMILIES = {
    "llama": dict(tie=False, norm_plus_one=False, embed_scale=False,
                  qk_norm=False, post_norms=False, default_theta=10000.0),
    "mistral": dict(tie=False, norm_plus_one=False, embed_scale=False,
                    qk_norm=False, post_norms=False, default_theta=10000.0),
    "qwen2": dict(tie=False, norm_plus_one=False, embed_scale=False,
                  qk_norm=False, post_norms=False, default_theta=10000.0),
    "qwen3": dict(tie=False, norm_plus_one=False, embed_scale=False,
                  qk_norm=True, post_norms=False, default_theta=10000.0),
    "gemma": dict(tie=True, norm_plus_one=True, embed_scale=True,
                  qk_norm=False, post_norms=False, default_theta=10000.0),
    "gemma2": dict(tie=True, norm_plus_one=True, embed_scale=True,
                   qk_norm=False, post_norms=True, default_theta=10000.0),
    "gemma3_text": dict(tie=True, norm_plus_one=True, embed_scale=True,
                        qk_norm=True, post_norms=True,
                        default_theta=1_000_000.0),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# Keys copied verbatim from the source config.json so that `to_hf_config`
# round-trips what the model itself does not use (token ids, architectures).
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id",
                "architectures", "initializer_range", "attention_dropout",
                "max_window_layers", "use_cache")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding frequencies (HF `rope_parameters` of one layer type).

  Attributes:
    theta: base wavelength.
    type: "default", "linear" or "llama3".
    factor: frequency division factor ("linear", "llama3").
    low_freq_factor, high_freq_factor, original_max_position_embeddings:
      "llama3" smoothing parameters.
  """
  theta: float = 10000.0
  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @classmethod
  def from_hf(cls, params: dict[str, Any], default_theta: float,
              source: str = "config.json") -> "RopeConfig":
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise UnsupportedModelError(
          f"{source}: rope_type {rope_type!r} is not supported (supported: "
          "default, linear, llama3)")
    kw = dict(theta=float(params.get("rope_theta", default_theta)),
              type=rope_type)
    if rope_type in ("linear", "llama3"):
      kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
      kw.update(low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params["original_max_position_embeddings"]))
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    out = {"rope_type": self.type, "rope_theta": self.theta}
    if self.type in ("linear", "llama3"):
      out["factor"] = self.factor
    if self.type == "llama3":
      out.update(low_freq_factor=self.low_freq_factor,
                 high_freq_factor=self.high_freq_factor,
                 original_max_position_embeddings=(
                     self.original_max_position_embeddings))
    return out

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Inverse frequencies [K/2] float32, as transformers computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
    inv = (1.0 / (np.float32(self.theta) ** (exponent / head_dim)))
    inv = inv.astype(np.float32)
    if self.type == "linear":
      inv = inv / np.float32(self.factor)
    elif self.type == "llama3":
      old_len = self.original_max_position_embeddings
      low_wavelen = old_len / self.low_freq_factor
      high_wavelen = old_len / self.high_freq_factor
      wavelen = 2 * np.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = ((old_len / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor))
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the kernels whose module path matches `targets`.

  Attributes:
    rank: R.
    alpha: the delta is scaled by alpha / R (alpha / sqrt(R) with rslora).
    rslora: rank-stabilised scaling.
    targets: regex searched in "/"-joined module paths such as
      "layers/attn/q_proj" or "layers/mlp/down_proj".
    dropout: PEFT's lora_dropout: dropout on the adapter's input only, active
      when `apply` is given a "dropout" rng (training).
  """
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  targets: str = r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (from config.json) plus runtime options (ours).

  Build with `ModelConfig.from_hf_config(config_dict)`; change runtime
  options with `dataclasses.replace`.
  """
  model_type: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # N
  head_dim: int  # K
  rms_norm_eps: float = 1e-6
  activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # RMSNorm over K on queries and keys (qwen3, gemma3)
  norm_plus_one: bool = False  # gemma: norms scale by (1 + w)
  embed_scale: bool = False  # gemma: embeddings times sqrt(D)
  post_norms: bool = False  # gemma2/3: norms after attention and MLP too
  query_scale: float = 0.0  # attention logit scale; 0 means K ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()  # per layer, FULL or SLIDING
  rope: RopeConfig = RopeConfig()
  rope_local: RopeConfig | None = None  # sliding layers' rope (gemma3)
  max_position_embeddings: int = 8192
  passthrough: str = "{}"  # JSON of untouched config.json keys
  # "gemma3": read from an image-text checkpoint's language model (the
  # vision tower is skipped); save_hf writes the text-only model.
  hf_wrapper: str = ""
  # Runtime options, not part of the checkpoint.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = True  # lax.scan over layers (else fully unrolled)
  remat: str = "none"  # a policy of remat.py ("none", "full", ...)
  attention_impl: str = "auto"  # see attention.py
  lora: LoraConfig | None = None
  # Frozen base quantization of the layers' kernels (see quant.py):
  # "" (none) | "nf4" | "int8", in blocks of quant_block input rows.
  quant: str = ""
  quant_block: int = 64
  quant_double: bool = False  # the block scales quantized too (uint8)
  # Training with the bottom N layers frozen: they run as a scan of their
  # own over params "frozen_layers" (layers/... holds the top L - N), so no
  # weight gradient is computed for them. Never in a checkpoint or export.
  frozen_layers: int = 0

  @property
  def scale(self) -> float:
    return self.query_scale or self.head_dim ** -0.5

  def layer_windows(self) -> np.ndarray:
    """Sliding window per layer [L] int32; 0 means unlimited."""
    return np.array([(self.sliding_window or 0) if t == SLIDING else 0
                     for t in self.layer_types], np.int32)

  def attention_windows(self) -> tuple[int, ...]:
    """The distinct windows of the layers (0 = full): the attention patterns.

    Gemma-2 alternates two, Gemma-3 has two in a period of 6, Qwen with
    max_window_layers two in blocks; each is one static kernel.
    """
    return tuple(sorted({int(w) for w in self.layer_windows()}))

  def layer_patterns(self) -> np.ndarray:
    """Per layer [L] int32: its index into attention_windows()."""
    windows = self.attention_windows()
    return np.array([windows.index(int(w)) for w in self.layer_windows()],
                    np.int32)

  def layer_inv_freq(self) -> np.ndarray:
    """Rotary inverse frequencies per layer [L, K/2] float32."""
    rows = []
    for t in self.layer_types:
      rope = self.rope_local if (t == SLIDING and self.rope_local) else self.rope
      rows.append(rope.inv_freq(self.head_dim))
    return np.stack(rows)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any],
                     source: str = "config.json") -> "ModelConfig":
    """Reads a HF config dict (transformers 4.x or 5.x spelling)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
      # Image-text Gemma 3: its language model alone (weights under
      # "language_model."); hub configs leave most text keys to defaults.
      import transformers  # pylint: disable=g-import-not-at-top
      text = transformers.Gemma3TextConfig(**hf["text_config"]).to_dict()
      text.setdefault("tie_word_embeddings",
                      hf.get("tie_word_embeddings", True))
      cfg = cls.from_hf_config(dict(text, model_type="gemma3_text"), source)
      return dataclasses.replace(cfg, hf_wrapper="gemma3")
    if model_type not in _FAMILIES:
      raise UnsupportedModelError(
          f"{source}: model_type {model_type!r} is not supported; "
          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    fam = _FAMILIES[model_type]
    gemma = model_type.startswith("gemma")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layers = hf["num_hidden_layers"]
    if hf.get("use_bidirectional_attention"):
      raise UnsupportedModelError(
          f"{source}: use_bidirectional_attention is not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      raise UnsupportedModelError(
          f"{source}: partial_rotary_factor != 1 is not supported")

    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if gemma and act == "gelu":
      act = "gelu_pytorch_tanh"  # transformers' reading of legacy configs
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu": "gelu"}
    if act not in acts:
      raise UnsupportedModelError(f"{source}: activation {act!r}")

    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
      window = None
    if not layer_types:
      if model_type == "gemma2":
        layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
      elif model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = [SLIDING if (i + 1) % pattern else FULL
                       for i in range(layers)]
      elif model_type in ("qwen2", "qwen3") and window is not None:
        first = hf.get("max_window_layers", layers)
        layer_types = [SLIDING if i >= first else FULL for i in range(layers)]
      elif model_type == "mistral" and window is not None:
        layer_types = [SLIDING] * layers
      else:
        layer_types = [FULL] * layers
    if model_type == "mistral" and window is not None:
      layer_types = [SLIDING] * layers  # mistral windows every layer
    if len(layer_types) != layers or set(layer_types) - {FULL, SLIDING}:
      raise UnsupportedModelError(f"{source}: bad layer_types {layer_types}")
    if window is None:
      layer_types = [FULL] * layers

    rope_local = None
    params = hf.get("rope_parameters")
    theta = fam["default_theta"]
    if model_type == "gemma3_text":
      params = dict(params or {})
      full = dict(params.get(FULL) or {})
      full.update(hf.get("rope_scaling") or {})
      full.setdefault("rope_theta", hf.get("rope_theta", theta))
      local = dict(params.get(SLIDING) or {})
      local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
      rope = RopeConfig.from_hf(full, theta, source)
      rope_local = RopeConfig.from_hf(local, 10000.0, source)
    else:
      params = dict(params or {})
      params.update(hf.get("rope_scaling") or {})
      params.setdefault("rope_theta", hf.get("rope_theta", theta))
      rope = RopeConfig.from_hf(params, theta, source)

    bias = bool(hf.get("attention_bias", False))
    query_scale = 0.0
    if model_type in ("gemma2", "gemma3_text"):
      query_scale = float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5
    tie = hf.get("tie_word_embeddings")
    return cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=acts[act],
        tie_embeddings=fam["tie"] if tie is None else bool(tie),
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=fam["qk_norm"],
        norm_plus_one=fam["norm_plus_one"],
        embed_scale=fam["embed_scale"],
        post_norms=fam["post_norms"],
        query_scale=query_scale,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=window,
        layer_types=tuple(layer_types),
        rope=rope,
        rope_local=rope_local,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        passthrough=json.dumps({k: hf[k] for k in _PASSTHROUGH if k in hf},
                               sort_keys=True),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """A config.json dict that transformers reads back as this model."""
    acts = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
    out = dict(json.loads(self.passthrough))
    out.update(
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps,
        hidden_act=acts[self.activation],
        tie_word_embeddings=self.tie_embeddings,
        max_position_embeddings=self.max_position_embeddings,
        sliding_window=self.sliding_window,
        layer_types=list(self.layer_types),
        torch_dtype=self.param_dtype,
    )
    out.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
    if self.model_type == "mistral":
      # transformers reads a mistral config with layer_types as "ministral";
      # mistral's layers are all alike, so sliding_window says it all.
      del out["layer_types"]
    if self.model_type.startswith("gemma"):
      out["hidden_activation"] = acts[self.activation]
    if self.model_type == "qwen2":
      out["use_sliding_window"] = self.sliding_window is not None
    elif self.model_type in ("llama", "qwen3", "gemma", "gemma2",
                             "gemma3_text"):
      out["attention_bias"] = self.qkv_bias
    if self.model_type == "qwen3":
      out["use_sliding_window"] = self.sliding_window is not None
    if self.model_type == "llama":
      out["mlp_bias"] = self.mlp_bias
    if self.query_scale:
      scalar = round(self.query_scale ** -2, 6)
      # transformers' gemma configs validate this field as an int.
      out["query_pre_attn_scalar"] = (int(scalar) if scalar.is_integer()
                                      else scalar)
    if self.model_type in ("gemma2", "gemma3_text"):
      out["attn_logit_softcapping"] = self.attn_softcap
      out["final_logit_softcapping"] = self.final_softcap
    if self.model_type == "gemma3_text":
      out["rope_parameters"] = {FULL: self.rope.to_hf(),
                                SLIDING: self.rope_local.to_hf()}
    else:
      out["rope_parameters"] = self.rope.to_hf()
      out["rope_theta"] = self.rope.theta  # transformers 4.x spelling
      if self.rope.type != "default":
        out["rope_scaling"] = self.rope.to_hf()
    return out


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
