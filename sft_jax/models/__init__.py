"""HF causal LMs (llama, mistral, qwen2/3, gemma/2/3) as one Flax decoder.

  cfg, params = models.load_hf("dir/or/hub-id", dtype=None, shardings=None)
  cfg = dataclasses.replace(cfg, dtype="bfloat16", remat="full",
                            lora=models.LoraConfig(rank=8, alpha=16.0))
  model = models.Transformer(cfg)
  logits_BxTxV = model.apply({"params": params, "lora": lora},
                             tokens_BxT, positions_BxT, segment_ids_BxT)
  hidden_BxTxD = model.apply(..., return_hidden=True)   # after final norm
  logits_BxTxV = models.logits_from_hidden(
      hidden_BxTxD, models.unembedding(params, cfg), cfg)
  cache = models.init_cache(cfg, batch_size, max_len)
  logits, cache = model.apply(variables, tokens, positions, segment_ids,
                              cache=cache, cache_index=i)
  variables = models.init(cfg, rng)       # {"params"[, "lora"]}, jitted
  axes = models.logical_axes(cfg)         # same tree, tuples of axis names
  params = models.merge_lora(params, lora, cfg)
  models.save_hf(cfg, params, out_dir, dtype="bfloat16")

Segment id 0 is padding; attention is causal within a segment: by index in
training (positions count up by one inside a segment), by position against a
KV cache. cfg.attention_impl picks the backend (attention.py; "auto" by
default), cfg.remat the remat policy (remat.py).
The params tree, shapes and the HF name of every tensor: transformer.py and
tables.py. PEFT: peft_tensors / peft_config / lora_from_peft, module names
from hf_module_name(path, layer, model_type).
"""

from sft_jax.models.attention import (
    IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS)
from sft_jax.models.checkpoint import load_hf
from sft_jax.models.checkpoint import param_shapes
from sft_jax.models.checkpoint import resolve
from sft_jax.models.checkpoint import save_hf
from sft_jax.models.config import LoraConfig
from sft_jax.models.config import ModelConfig
from sft_jax.models.config import RopeConfig
from sft_jax.models.config import SUPPORTED_MODEL_TYPES
from sft_jax.models.errors import CheckpointError
from sft_jax.models.errors import MissingTensorError
from sft_jax.models.errors import ShapeMismatchError
from sft_jax.models.errors import UnexpectedTensorError
from sft_jax.models.errors import UnsupportedModelError
from sft_jax.models.lora import lora_from_peft
from sft_jax.models.lora import lora_modules
from sft_jax.models.lora import merge_lora
from sft_jax.models.lora import peft_config
from sft_jax.models.lora import peft_tensors
from sft_jax.models.quant import dequantize_params
from sft_jax.models.sharding import activation_sharding
from sft_jax.models.sharding import constrain
from sft_jax.models.sharding import logical_axes
from sft_jax.models.tables import hf_module_name
from sft_jax.models.transformer import init
from sft_jax.models.transformer import init_cache
from sft_jax.models.transformer import init_lora
from sft_jax.models.transformer import REMAT_POLICIES
from sft_jax.models.transformer import attention_summary
from sft_jax.models.transformer import logits_from_hidden
from sft_jax.models.transformer import Transformer
from sft_jax.models.transformer import unembedding
