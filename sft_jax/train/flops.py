"""Model FLOPs per token and device peak FLOP/s, for MFU.

Convention (MaxText, causal attention): every matmul counts 2 FLOPs per
multiply-add forward and twice that backward, so a trained weight costs
6 FLOPs per token; attention scores and values add 6 * L * T * H * K per
token (half the non-causal count). The unembedding is a matmul and counts;
the embedding lookup does not. Sliding windows are not discounted.

Methods: "full" = 6 * N_matmul + attention. Frozen weights need no weight
gradient, so "lora" = 4 * N_matmul + attention + 6 * N_lora, and "freeze" =
4 * N_matmul + 2 * N_trainable_matmul + attention.
"""

import re

# bf16 dense peak FLOP/s per device, matched against `device.device_kind`.
# H100 and H200 share the GH100 die: 989 TFLOP/s dense (1,979 is sparse).
PEAK_FLOPS = (
    (r"H100", 989e12),
    (r"H200", 989e12),
    (r"GH200", 989e12),
    (r"A100", 312e12),
    (r"TPU v5 ?lite|TPU v5e", 197e12),
    (r"TPU v5p|TPU v5$", 459e12),
    (r"TPU v6 ?lite|TPU v6e", 918e12),
    (r"TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
  for pattern, flops in PEAK_FLOPS:
    if re.search(pattern, device_kind):
      return flops
  return None


def matmul_params(model_cfg) -> dict[str, int]:
  """Weights used in matmuls, per token: {"layers": ..., "unembed": ...}."""
  c = model_cfg
  attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  return {"layers": c.num_layers * (attn + mlp),
          "unembed": c.hidden_size * c.vocab_size}


def lora_params(model_cfg) -> int:
  """Adapter weights (a and b) over all targeted projections and layers."""
  c, lora = model_cfg, model_cfg.lora
  if lora is None:
    return 0
  shapes = {  # module path -> (in, out)
      "layers/attn/q_proj": (c.hidden_size, c.num_heads * c.head_dim),
      "layers/attn/k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
      "layers/attn/v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
      "layers/attn/o_proj": (c.num_heads * c.head_dim, c.hidden_size),
      "layers/mlp/gate_proj": (c.hidden_size, c.intermediate_size),
      "layers/mlp/up_proj": (c.hidden_size, c.intermediate_size),
      "layers/mlp/down_proj": (c.intermediate_size, c.hidden_size),
  }
  per_layer = sum(lora.rank * (i + o) for path, (i, o) in shapes.items()
                  if re.search(lora.targets, path))
  return c.num_layers * per_layer


def flops_per_token(model_cfg, seq_len: int, method: str = "full",
                    trainable_matmul_params: int = 0) -> float:
  """Training FLOPs per token (forward + backward) under the convention above.

  trainable_matmul_params: for "freeze", the trained matmul weights.
  """
  c = model_cfg
  n = sum(matmul_params(c).values())
  attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim
  if method == "full":
    return 6 * n + attention
  if method in ("lora", "qlora"):  # qlora: the same matmuls, dequantized
    return 4 * n + attention + 6 * lora_params(c)
  if method == "freeze":
    return 4 * n + 2 * trainable_matmul_params + attention
  raise ValueError(f"unknown method {method!r}")
