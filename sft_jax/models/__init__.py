"""HF causal LMs (llama, mistral, qwen2/3, gemma/2/3) as one Flax decoder.

  cfg, params = models.load_hf("path/or/hub-id")
  logits_BxTxV = models.Transformer(cfg).apply(
      {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)
"""

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
from sft_jax.models.sharding import logical_axes
from sft_jax.models.tables import hf_module_name
from sft_jax.models.transformer import init
from sft_jax.models.transformer import init_cache
from sft_jax.models.transformer import init_lora
from sft_jax.models.transformer import logits_from_hidden
from sft_jax.models.transformer import Transformer
from sft_jax.models.transformer import unembedding
