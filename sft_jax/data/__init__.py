"""Data: raw records -> packed, loss-masked batches.

Public API:
  default_config() / source_config(**kw)     the `data` config section
  load_tokenizer(path_or_hub_id, chat_template=None)
  chat_template(data_cfg, tok) -> str | None  the exact template data uses
  make_train_pipeline(data_cfg, tok, *, seq_len, batch_size, process_index=0,
                      process_count=1, seed=0, teacher_cache="", rows=None)
                      -> grain.IterDataset  (teacher_cache: teacher_cache.py)
  make_eval_batches(data_cfg, tok, *, seq_len, batch_size, process_index=0,
                    process_count=1, rows=None) -> {eval set name: [batch, ...]}
  source_names(data_cfg) / eval_source_names(data_cfg)   index = source_id
  prepare_source(name, src_cfg, data_cfg, tok, *, seq_len)  tokenized + fitted
  DataError                                   bad data or configuration

Decisions:
  - One mask rule (turns.py): a supervised turn is what the model generates
    after render(turns[:k], add_generation_prompt=True), through its stop
    token. Templates that rewrite history give each rewritten turn its own
    example (history="split"). {% generation %} markers are cross-checked;
    a disagreement is reported and the rule wins (strict: it stops the run).
  - prompt_completion with a chat template renders the prompt as a user turn
    and the completion as the reply (source key prompt_as_user_turn=False:
    plain concatenation, tokenizer BOS, completion + EOS supervised). Raw text
    gets the tokenizer's BOS, an EOS, and loss on every token.
  - Lengths are fitted after the cache (too_long: drop, or cut the prompt from
    the left keeping the final reply and BOS; a fully supervised example such
    as raw text is split into rows overlapping by one token).
  - batch_size is global; every process builds the same global batches and
    keeps `rows` (the mesh's rows for its devices: train.sharding.process_rows)
    or, without rows, its contiguous 1/process_count block.
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
from sft_jax.data.pipeline import split_starts
from sft_jax.data.render import chat_template
from sft_jax.data.render import Encoder
from sft_jax.data.render import load_tokenizer
