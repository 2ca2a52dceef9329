"""Data: raw records -> packed, loss-masked batches (see pipeline.py).

Public API:
  default_config(), source_config(**kw)      the `data` config section
  load_tokenizer(path, chat_template=None)    a tokenizer with the template
  chat_template(data_cfg, tok)                the exact template data uses
  make_train_pipeline(data_cfg, tok, *, seq_len, batch_size, ...)
  make_eval_batches(data_cfg, tok, *, seq_len, batch_size, ...)
  source_names(data_cfg), eval_source_names(data_cfg)
  DataError                                   raised for bad data/config
"""

from sft_jax.data.config import default_config
from sft_jax.data.config import source_config
from sft_jax.data.errors import DataError
from sft_jax.data.errors import DropLog
from sft_jax.data.pipeline import BATCH_KEYS
from sft_jax.data.pipeline import eval_source_names
from sft_jax.data.pipeline import fit_length
from sft_jax.data.pipeline import make_eval_batches
from sft_jax.data.pipeline import make_train_pipeline
from sft_jax.data.pipeline import prepare_source
from sft_jax.data.pipeline import source_names
from sft_jax.data.render import chat_template
from sft_jax.data.render import Encoder
from sft_jax.data.render import load_tokenizer
