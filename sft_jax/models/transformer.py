"""One functional decoder for every supported family (see config.py).

Params (a plain nested dict; layers stacked on a leading L axis):
  embedder/embedding [V, D]
  layers/input_norm/scale [L, D]        layers/pre_mlp_norm/scale [L, D]
  layers/post_attn_norm/scale [L, D]    layers/post_mlp_norm/scale [L, D]
                                        (the last two with cfg.post_norms)
  layers/attn/{q,k,v}_proj/kernel [L, D, H*K or N*K] (+ bias [L, H*K or N*K])
  layers/attn/o_proj/kernel [L, H*K, D] (+ bias [L, D])
  layers/attn/{q,k}_norm/scale [L, K]   (with cfg.qk_norm)
  layers/mlp/{gate,up}_proj/kernel [L, D, F]; layers/mlp/down_proj/kernel
    [L, F, D] (+ biases with cfg.mlp_bias)
  final_norm/scale [D]
  lm_head/kernel [D, V]                 (unless cfg.tie_embeddings)
Kernels are [in, out]. LoRA lives in the "lora" collection at the same
module paths: a [L, in, R], b [L, R, out].

The layer index and each layer's row of the RoPE tables (rope.py, computed
once per forward pass) are scanned inputs. The attention
pattern is static: the stack is scanned in groups of one period of patterns
(layer_scan.py), so each layer compiles only its own window as a Python int
(for splash LocalMask, cuDNN, block skipping), with the same params tree.

Attention runs in train mode (causality by index within segments) without a
cache and in cache mode (by position) with one. The KV cache is carried
through the layer scan and each layer writes only its new slots into it, so
decoding updates it in place rather than copying [L, B, S, N, K] per token.
"""

import functools
import re

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from sft_jax.models import attention as attention_lib
from sft_jax.models import dense
from sft_jax.models import layer_scan
from sft_jax.models import quant as quant_lib
from sft_jax.models import remat as remat_lib
from sft_jax.models import rope
from sft_jax.models.config import ModelConfig
from sft_jax.models.sharding import constrain
from sft_jax.models.sharding import constrain_weight
from sft_jax.models.sharding import gathered_matmul

# Activation layouts (logical names: see sharding.py).
_BTD = ("batch", "length", "act_embed")
_BTHK = ("batch", "length", "act_heads", None)
_BTNK = ("batch", "length", "act_kv_heads", None)
_BTF = ("batch", "length", "act_mlp")

_KERNEL_INIT = nn.initializers.normal(0.02)
# PEFT's default for A (kaiming uniform, a=sqrt(5)): U(+-1/sqrt(in)).
_LORA_A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def lora_targeted(cfg: ModelConfig, module_path: str) -> bool:
  """Whether the module at "/"-joined `module_path` carries LoRA."""
  return cfg.lora is not None and bool(re.search(cfg.lora.targets,
                                                 module_path))


class _Dense(nn.Module):
  """x @ kernel [+ bias] [+ scale * (x @ a) @ b]."""
  cfg: ModelConfig
  features: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BxTxI):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    in_features = x_BxTxI.shape[-1]
    init = _KERNEL_INIT
    if cfg.quant:  # A frozen quantized base: {"codes", "scale"}.
      init = quant_lib.quantized_init(init, cfg.quant, cfg.quant_block,
                                      cfg.quant_double)
    kernel_IxO = self.param("kernel", init, (in_features, self.features),
                            pdtype)
    if quant_lib.is_quantized(kernel_IxO):
      kernel_IxO = quant_lib.dequantize(kernel_IxO, dtype)
    y_BxTxO = gathered_matmul(x_BxTxI, kernel_IxO.astype(dtype),
                              self.scope.path)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        pdtype)
      y_BxTxO = y_BxTxO + bias.astype(dtype)[None, None, :]
    path = layer_scan.logical_path(self.scope.path)
    if lora_targeted(cfg, path):
      if not (self.is_initializing() or self.has_variable("lora", "a")):
        raise ValueError(
            f"cfg.lora targets {path} but no 'lora' "
            "variables were passed to apply (pass {'params': p, 'lora': l}, "
            "or set cfg.lora=None for merged or base params)")
      rank = cfg.lora.rank
      a_IxR = self.variable(
          "lora", "a", lambda: _LORA_A_INIT(self.make_rng("params"),
                                            (in_features, rank), pdtype)).value
      b_RxO = self.variable(
          "lora", "b", lambda: jnp.zeros((rank, self.features), pdtype)).value
      x_lora = x_BxTxI
      if cfg.lora.dropout > 0 and self.has_rng("dropout"):
        # As PEFT: dropout on the adapter's input only, never the base path.
        keep = jax.random.bernoulli(self.make_rng("dropout"),
                                    1.0 - cfg.lora.dropout, x_BxTxI.shape)
        x_lora = jnp.where(keep, x_BxTxI / (1.0 - cfg.lora.dropout), 0.0
                           ).astype(x_BxTxI.dtype)
      delta = jnp.einsum("bti,ir->btr", x_lora, a_IxR.astype(dtype))
      delta = jnp.einsum("btr,ro->bto", delta, b_RxO.astype(dtype))
      y_BxTxO = y_BxTxO + (delta * cfg.lora.scale).astype(dtype)
    return y_BxTxO


class _RMSNorm(nn.Module):
  """RMSNorm over the last axis in float32; gemma scales by (1 + w)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],),
                       jnp.dtype(cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(
        jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
    if cfg.norm_plus_one:
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    # Llama-style: back to the input dtype before the weight, as HF does.
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class _Attention(nn.Module):
  cfg: ModelConfig
  window: int = 0  # static sliding window; 0 = unlimited

  @nn.compact
  def __call__(self, x_BxTxD, layer, positions_BxT, segment_ids_BxT,
               kv_positions_BxS, kv_segment_ids_BxS, cache_index, kv_cache,
               rope_tables):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _Dense(cfg, h * k, cfg.qkv_bias, name="q_proj")(x_BxTxD)
    kk = _Dense(cfg, n * k, cfg.qkv_bias, name="k_proj")(x_BxTxD)
    v = _Dense(cfg, n * k, cfg.qkv_bias, name="v_proj")(x_BxTxD)
    q_BxTxHxK = checkpoint_name(constrain(q.reshape(b, t, h, k), _BTHK),
                                "query_proj")
    k_BxTxNxK = checkpoint_name(constrain(kk.reshape(b, t, n, k), _BTNK),
                                "key_proj")
    v_BxTxNxK = checkpoint_name(constrain(v.reshape(b, t, n, k), _BTNK),
                                "value_proj")
    if cfg.qk_norm:
      q_BxTxHxK = _RMSNorm(cfg, name="q_norm")(q_BxTxHxK)
      k_BxTxNxK = _RMSNorm(cfg, name="k_norm")(k_BxTxNxK)
    cos_sin = rope.layer_tables(rope_tables, layer["rope"])
    q_BxTxHxK = rope.apply(q_BxTxHxK, *cos_sin)
    k_BxTxNxK = rope.apply(k_BxTxNxK, *cos_sin)
    if kv_cache is None:
      new_cache, mode = None, "train"
      k_all, v_all = k_BxTxNxK, v_BxTxNxK
    else:
      # Write this layer's new slots into the whole [L, ...] cache (in
      # place inside the scan), then read the layer back.
      k_cache, v_cache = kv_cache
      start = (layer["index"], 0, cache_index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(
          k_cache, k_BxTxNxK.astype(k_cache.dtype)[None], start)
      v_cache = jax.lax.dynamic_update_slice(
          v_cache, v_BxTxNxK.astype(v_cache.dtype)[None], start)
      new_cache, mode = (k_cache, v_cache), "cache"
      k_all = jax.lax.dynamic_index_in_dim(k_cache, layer["index"], 0, False)
      v_all = jax.lax.dynamic_index_in_dim(v_cache, layer["index"], 0, False)
    out_BxTxHxK = attention_lib.attention(
        q_BxTxHxK, k_all.astype(q_BxTxHxK.dtype),
        v_all.astype(q_BxTxHxK.dtype), positions_BxT, segment_ids_BxT,
        kv_positions_BxS, kv_segment_ids_BxS, window=self.window or None,
        softcap=cfg.attn_softcap, scale=cfg.scale, impl=cfg.attention_impl,
        mode=mode)
    out_BxTxHxK = checkpoint_name(constrain(out_BxTxHxK, _BTHK), "context")
    out = _Dense(cfg, cfg.hidden_size, cfg.o_bias, name="o_proj")(
        out_BxTxHxK.reshape(b, t, h * k))
    return checkpoint_name(out, "out_proj"), new_cache


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(activation, gate_BxTxF, up_BxTxF):
  """activation(gate) * up, saving only gate and up for the backward pass.

  Left to autodiff, the activation's intermediates (sigmoid, silu(gate)) are
  saved and each backward term is its own pass; here the backward pass
  recomputes the activation inside one elementwise pass.
  """
  return _ACTIVATIONS[activation](gate_BxTxF) * up_BxTxF


def _gated_fwd(activation, gate_BxTxF, up_BxTxF):
  return _gated(activation, gate_BxTxF, up_BxTxF), (gate_BxTxF, up_BxTxF)


def _gated_bwd(activation, residuals, d_BxTxF):
  gate_BxTxF, up_BxTxF = residuals
  act_BxTxF, act_vjp = jax.vjp(_ACTIVATIONS[activation], gate_BxTxF)
  return act_vjp(d_BxTxF * up_BxTxF)[0], d_BxTxF * act_BxTxF


_gated.defvjp(_gated_fwd, _gated_bwd)


class _Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    f = cfg.intermediate_size
    gate = checkpoint_name(constrain(
        _Dense(cfg, f, cfg.mlp_bias, name="gate_proj")(x_BxTxD), _BTF),
                           "mlpwi_0")
    up = checkpoint_name(constrain(
        _Dense(cfg, f, cfg.mlp_bias, name="up_proj")(x_BxTxD), _BTF),
                         "mlpwi_1")
    return checkpoint_name(
        _Dense(cfg, cfg.hidden_size, cfg.mlp_bias, name="down_proj")(
            _gated(cfg.activation, gate, up)), "mlpwo")


class _Block(nn.Module):
  """One decoder layer; the residual stream stays in the compute dtype."""
  cfg: ModelConfig
  window: int = 0  # static sliding window of this layer; 0 = unlimited

  @nn.compact
  def __call__(self, carry, layer, positions_BxT, segment_ids_BxT,
               kv_positions_BxS, kv_segment_ids_BxS, cache_index,
               rope_tables):
    cfg = self.cfg
    x_BxTxD, kv_cache = carry
    x_BxTxD = checkpoint_name(constrain(x_BxTxD, _BTD), remat_lib.LAYER_INPUT)
    h = _RMSNorm(cfg, name="input_norm")(x_BxTxD)
    h, new_cache = _Attention(cfg, self.window, name="attn")(
        h, layer, positions_BxT, segment_ids_BxT, kv_positions_BxS,
        kv_segment_ids_BxS, cache_index, kv_cache, rope_tables)
    if cfg.post_norms:
      h = _RMSNorm(cfg, name="post_attn_norm")(h)
    x_BxTxD = x_BxTxD + h
    h = _RMSNorm(cfg, name="pre_mlp_norm")(x_BxTxD)
    h = _Mlp(cfg, name="mlp")(h)
    if cfg.post_norms:
      h = _RMSNorm(cfg, name="post_mlp_norm")(h)
    return (constrain(x_BxTxD + h, _BTD), new_cache), None


class _Embed(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding", _KERNEL_INIT, (cfg.vocab_size, cfg.hidden_size),
        jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_BxT):
    dtype = jnp.dtype(self.cfg.dtype)
    # Gathered over the batch axes first, so each device looks up its own
    # rows instead of XLA moving rows of activations between devices.
    table_VxD = constrain_weight(self.embedding, ("vocab", "embed"))
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(dtype)
    if self.cfg.embed_scale:
      # Rounded to the compute dtype first, as transformers does.
      x_BxTxD = x_BxTxD * jnp.asarray(self.cfg.hidden_size ** 0.5, dtype)
    return x_BxTxD


class _LmHead(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.kernel = self.param("kernel", _KERNEL_INIT,
                             (cfg.hidden_size, cfg.vocab_size),
                             jnp.dtype(cfg.param_dtype))

  def __call__(self):
    return self.kernel


REMAT_POLICIES = remat_lib.POLICIES


def logits_from_hidden(hidden_BxTxD, w_DxV, cfg: ModelConfig):
  """float32 logits [B, T, V] from final hidden states, soft-capped if set."""
  logits_BxTxV = dense.matmul(hidden_BxTxD, w_DxV.astype(hidden_BxTxD.dtype),
                              jnp.float32)
  if cfg.final_softcap:
    logits_BxTxV = jnp.tanh(logits_BxTxV / cfg.final_softcap) * (
        cfg.final_softcap)
  return logits_BxTxV


def unembedding(params, cfg: ModelConfig):
  """The [D, V] output projection: lm_head, or the embedding's transpose."""
  if cfg.tie_embeddings:
    return params["embedder"]["embedding"].T
  return params["lm_head"]["kernel"]


class Transformer(nn.Module):
  """Decoder-only LM; see the module docstring for the params tree."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, *,
               cache=None, cache_index=None, return_hidden: bool = False):
    """Forward pass.

    Args:
      tokens_BxT, positions_BxT, segment_ids_BxT: int32; segment 0 = padding.
      cache: optional `init_cache` dict; the new tokens are written at
        slots [cache_index, cache_index + T) and attend to every filled slot.
      cache_index: int32 scalar write offset (required with `cache`). The
        caller keeps cache_index + T <= max_len: a Python int is checked, a
        traced one cannot be (dynamic_update_slice would clamp it).
      return_hidden: return the final-normed hidden states [B, T, D]
        instead of logits.

    Returns:
      float32 logits [B, T, V] (or hidden states), and the updated cache
      when `cache` was given.
    """
    cfg = self.cfg
    if cache is not None:
      if cache_index is None:
        raise ValueError("cache_index is required with a cache")
      slots = cache["positions"].shape[1]
      if isinstance(cache_index, int) and cache_index + tokens_BxT.shape[1] > (
          slots):
        raise ValueError(f"writing {tokens_BxT.shape[1]} tokens at "
                         f"{cache_index} overflows a {slots}-slot cache")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      kv_positions_BxS = jax.lax.dynamic_update_slice(
          cache["positions"], positions_BxT.astype(jnp.int32),
          (0, cache_index))
      kv_segment_ids_BxS = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BxT.astype(jnp.int32),
          (0, cache_index))
      kv_cache = (cache["k"], cache["v"])
    else:
      cache_index = jnp.zeros((), jnp.int32)
      kv_positions_BxS, kv_segment_ids_BxS = positions_BxT, segment_ids_BxT
      kv_cache = None

    embedder = _Embed(cfg, name="embedder")
    x_BxTxD = constrain(embedder(tokens_BxT), _BTD)
    rope_tables, rope_rows = rope.stack_tables(
        cfg.layer_inv_freq(), positions_BxT, jnp.dtype(cfg.dtype))
    layer_inputs = {"index": jnp.arange(cfg.num_layers, dtype=jnp.int32),
                    "rope": rope_rows}
    if cfg.remat not in remat_lib.POLICIES:
      remat_lib.policy(cfg.remat)  # raises the unknown-policy error

    windows = cfg.layer_windows()

    def scan(carry, name, lo, hi):
      # Scanned in groups of one attention pattern (layer_scan.py).
      stack = layer_scan.layer_stack(
          _Block, cfg, windows[lo:hi], unroll=not cfg.scan_layers, name=name,
          init=self.is_initializing())
      return stack(carry, jax.tree.map(lambda a: a[lo:hi], layer_inputs),
                   positions_BxT, segment_ids_BxT, kv_positions_BxS,
                   kv_segment_ids_BxS, cache_index, rope_tables)

    lo = cfg.frozen_layers
    if lo:  # Training only (see ModelConfig.frozen_layers).
      if cache is not None:
        raise ValueError("cfg.frozen_layers is for training, not decoding")
      x_BxTxD, _ = scan((x_BxTxD, None), "frozen_layers", 0, lo)
    x_BxTxD, new_kv = scan((x_BxTxD, kv_cache), "layers", lo, cfg.num_layers)
    hidden_BxTxD = _RMSNorm(cfg, name="final_norm")(x_BxTxD)
    if return_hidden:
      out = hidden_BxTxD
    else:
      w_DxV = (embedder.embedding.T if cfg.tie_embeddings
               else _LmHead(cfg, name="lm_head")())
      out = logits_from_hidden(hidden_BxTxD, w_DxV, cfg)
    if cache is None:
      return out
    new_cache = {"k": new_kv[0], "v": new_kv[1],
                 "positions": kv_positions_BxS,
                 "segment_ids": kv_segment_ids_BxS}
    return out, new_cache


def attention_summary(cfg: ModelConfig) -> str:
  """The attention backend per pattern and the remat policy, for logs."""
  return attention_lib.summary(cfg.attention_impl, cfg.attention_windows(),
                               cfg.attn_softcap, cfg.remat)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None):
  """An empty KV cache of `max_len` slots.

  Returns:
    {"k", "v": [L, B, S, N, K] in `dtype` (default cfg.dtype),
     "positions", "segment_ids": [B, S] int32 (segment 0 = empty slot)}.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads,
           cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "positions": jnp.zeros((batch_size, max_len), jnp.int32),
          "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32)}


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, rng):
  """Fresh variables: {"params": ...} plus {"lora": ...} when cfg.lora is set.

  Jitted (cfg static); under `jax.eval_shape` it gives the shapes only.
  """
  ones_1x1 = jnp.ones((1, 1), jnp.int32)
  variables = Transformer(cfg).init({"params": rng}, ones_1x1, ones_1x1 * 0,
                                    ones_1x1)
  return dict(variables)


def init_lora(cfg: ModelConfig, rng):
  """Only the "lora" collection of `init` (a = PEFT's init, b = 0)."""
  if cfg.lora is None:
    raise ValueError("cfg.lora is None")
  return init(cfg, rng)["lora"]
