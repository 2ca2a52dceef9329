"""The demo's train configs and its sweep: one file, up to two stages.

  stage=cpt  continued pretraining of the random base model on general chat
             (raw text, loss on every token); only when the size has
             cpt_steps > 0 (the "tiny" smoke test; the full demo has none);
  stage=sft  domain SFT on the JSON task (of the continued-pretrained model,
             or of the base model when there is no CPT), with a share of
             general chat mixed in; get_sweep() sweeps that share. Each SFT
             run evaluates its starting model at step 0 (eval.on_start): the
             "before" point.

All stages evaluate on the same two held-out sets, so their numbers compare:
"general" (chat text: general-data loss) and "domain" (the JSON task: loss on
the supervised answer tokens).

Knobs (`experiment.py:KNOB=VALUE,...`):
  root=DIR    the demo's work directory (absolute; holds data/ and base/)
  size=NAME   "full" (the README's run) or "tiny" (the smoke test)
  stage=NAME  "cpt" or "sft"
  general=S   sft: share of general data in the training stream
"""

import os
import pathlib

from sft_jax.demo import assets
from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib

_BASE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"
SFT_MODEL_DIR = "cpt_hf"  # under root: the stage-1 model in HF format


def _knobs(arg):
  knobs = config_lib.parse_arg(arg, root="", size="full", stage="sft",
                               general=0.0)
  if not knobs.root or not os.path.isabs(knobs.root):
    raise config_lib.ConfigError(
        f"demo config: root must be an absolute directory, got "
        f"{knobs.root!r}")
  if knobs.size not in assets.SIZES:
    raise config_lib.ConfigError(f"demo config: size={knobs.size!r}; known: "
                                 f"{sorted(assets.SIZES)}")
  if knobs.stage not in ("cpt", "sft"):
    raise config_lib.ConfigError(f"demo config: stage={knobs.stage!r}; "
                                 "expected cpt or sft")
  return knobs


def get_config(arg=None):
  knobs = _knobs(arg)
  size = assets.SIZES[knobs.size]
  paths = assets.data_paths(knobs.root)
  c = config_lib.get_config_from_file(str(_BASE))
  c.seed = 0
  if knobs.stage == "cpt" or not size.cpt_steps:
    c.model.path = os.path.join(knobs.root, "base")
  else:
    c.model.path = os.path.join(knobs.root, SFT_MODEL_DIR)
  # float32 on CPU: bf16 matmuls are slow there and the model is small.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.method.name = "full"

  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train.steps = size.cpt_steps if knobs.stage == "cpt" else size.sft_steps
  c.train.batch_size = size.batch_size
  c.train.seq_len = size.seq_len
  c.train.ce_chunk = size.seq_len
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  def general(path, **kw):
    return data_config.source_config(path=path, format="text", **kw)

  def domain(path, **kw):
    return data_config.source_config(path=path, format="messages",
                                     mask="assistant", **kw)

  if knobs.stage == "cpt":
    c.data.sources.general = general(paths["general_train"])
  else:
    c.data.sources.domain = domain(paths["domain_train"],
                                   weight=1.0 - knobs.general)
    c.data.sources.general = general(paths["general_train"],
                                     weight=knobs.general)
  c.data.eval_sources.general = general(paths["general_eval"])
  c.data.eval_sources.domain = domain(paths["domain_eval"])
  c.data.cache_dir = os.path.join(knobs.root, "cache")
  c.data.packing_bins = 16

  c.log.every_steps = 5
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 1
  # Synchronous saves: a 1M-parameter state saves in milliseconds, and a
  # busy 2-core machine can starve the background save thread.
  c.checkpoint.async_save = False
  # Both stages evaluate the same held-out sets, the final evaluation of
  # stage 1 being the "before SFT" numbers.
  c.eval.every_steps = size.eval_every
  # SFT evaluates the model it starts from at step 0: the "before" point.
  c.eval.on_start = knobs.stage == "sft"
  c.eval.batch_size = 8
  c.eval.generate = True
  c.eval.generate_data = paths["domain_eval"]
  c.eval.generate_max_records = size.domain_eval
  c.eval.generate_max_new_tokens = size.max_new_tokens
  c.eval.generate_metrics = ("exact_match", "json_valid")
  c.eval.generate_batch_size = 32
  return c


def shares(arg=None) -> tuple[float, ...]:
  return assets.SIZES[_knobs(arg).size].shares


def get_sweep(arg=None):
  """The SFT stage's points: general share s, domain weight 1 - s."""
  return [{"data.sources.general.weight": s,
           "data.sources.domain.weight": 1.0 - s} for s in shares(arg)]
