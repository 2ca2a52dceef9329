"""What a resume may and may not change.

A run directory records, at its start, what it trains: the base model's
content (`preflight.model_fingerprint`, also for a hub id once downloaded),
the tokenizer's files and chat template, and the architecture (the resolved
config). A resume with a different base, tokenizer, template, architecture
or method would silently continue some other run, so it is refused with one
line (`ResumeError`) unless `--allow-resume-change` says it is meant.

A resume that changes `train.steps` changes the learning-rate schedule; the
choice is explicit (`--schedule-on-resume keep|stretch|restart`) and its effect on
the learning rate is printed.
"""

import glob
import hashlib
import json
import os
from typing import Callable

from ml_collections import config_dict

from sft_jax import errors
from sft_jax import preflight
from sft_jax.train import optim

IDENTITY_FILE = "run_identity.json"

# Keys that decide which model and tokens a run trains on.
_IDENTITY_KEYS = (
    "model.path", "model.init", "model.hf_config", "data.tokenizer",
    "data.chat_template", "method.name", "method.lora.rank",
    "method.lora.targets", "method.lora.rslora", "method.trainable",
    "method.train_top_layers", "model.param_dtype")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = json.dumps(v) if isinstance(v, list) else v
  return out


def _tokenizer_fingerprint(cfg: config_dict.ConfigDict) -> str | None:
  """Hash of a local tokenizer directory's files and the chat template."""
  source = cfg.data.tokenizer or cfg.model.path
  local = os.path.expanduser(source) if source else ""
  if not os.path.isdir(local):
    local = preflight.resolve_hub_dir(source) if source else None
    if local is None:
      return None
  h = hashlib.sha256()
  for f in sorted(glob.glob(os.path.join(local, "*"))):
    name = os.path.basename(f)
    if os.path.isfile(f) and (name.startswith(("tokenizer", "special_tokens",
                                               "vocab", "merges", "chat_"))
                              or name.endswith((".jinja", ".model"))):
      h.update(name.encode())
      with open(f, "rb") as fh:
        h.update(fh.read())
  if cfg.data.chat_template:
    from sft_jax.data import render  # pylint: disable=g-import-not-at-top
    h.update(render.read_template(cfg.data.chat_template).encode())
  return h.hexdigest()[:16]


def identity(cfg: config_dict.ConfigDict) -> dict:
  """What the run's start is checked against on every resume."""
  model = None
  if cfg.model.path and cfg.model.init == "pretrained":
    model = preflight.model_fingerprint(cfg.model.path)
  return {"model.path": cfg.model.path, "model_fingerprint": model,
          "tokenizer_fingerprint": _tokenizer_fingerprint(cfg)}


def record_identity(cfg: config_dict.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, IDENTITY_FILE), "w") as f:
    json.dump(identity(cfg), f, indent=1)


def _comparable(a, b) -> bool:
  # A hub id not in the local cache has no content hash: nothing to compare.
  return (a is not None and b is not None and
          not str(a).startswith("hub:") and not str(b).startswith("hub:"))


def check(cfg: config_dict.ConfigDict, workdir: str, resume_step: int, *,
          allow_change: bool, schedule_choice: str | None,
          write: Callable[[str], None]) -> None:
  """Raises ResumeError on a change that resuming would silently mishandle.

  May set `cfg.optim.schedule_steps` (the `keep` schedule choice, or the
  one an earlier resume made). `write` prints a line for the user.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = _flat(errors.read_json(path, what="resume"))
  new = _flat(json.loads(cfg.to_json()))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  for key in changed:
    write(f"  config {key}: {old.get(key)!r} -> {new.get(key)!r}")

  keys = [k for k in _IDENTITY_KEYS if k in changed]
  problems = []
  recorded_path = os.path.join(workdir, IDENTITY_FILE)
  if os.path.exists(recorded_path):
    recorded = errors.read_json(recorded_path, what="resume")
    now = identity(cfg)
    for fp, key, what in (
        ("model_fingerprint", "model.path", "the base model's content"),
        ("tokenizer_fingerprint", "data.tokenizer",
         "the tokenizer files or chat template")):
      a, b = recorded.get(fp), now[fp]
      if not _comparable(a, b):
        continue
      if a == b and key in keys:
        keys.remove(key)  # Moved or renamed, the same content: fine.
      elif a != b and key not in keys:
        problems.append(f"{what} changed (fingerprint {a} -> {b})")
  problems = [f"{k} was {old.get(k)!r}, now {new.get(k)!r}"
              for k in keys] + problems
  if problems:
    message = (f"{workdir}: resuming step {resume_step} with " +
               "; ".join(problems) + ": that would silently continue the run "
               "on something else")
    if not allow_change:
      raise errors.ResumeError(
          message + ". Use a new --workdir, or pass --allow-resume-change if "
          "this is meant")
    write(f"warning: {message} (allowed by --allow-resume-change)")

  _check_schedule(cfg, old, resume_step, schedule_choice, write)


def _check_schedule(cfg, old: dict, resume_step: int, choice: str | None,
                    write: Callable[[str], None]) -> None:
  """A schedule is (start, end) in optimizer steps; see optim.schedule."""
  old_steps = old.get("train.steps")
  if old_steps is None:
    return
  old_start = old.get("optim.schedule_start") or 0
  old_end = old.get("optim.schedule_steps") or old_steps
  new = (cfg.optim.schedule_start, cfg.optim.schedule_steps or cfg.train.steps)
  if new == (old_start, old_end):
    return
  if (cfg.train.steps == old_steps and cfg.optim.schedule_steps == 0 and
      cfg.optim.schedule_start == 0):
    # An earlier resume made a choice; the same command keeps it.
    cfg.optim.schedule_start = old_start
    cfg.optim.schedule_steps = old.get("optim.schedule_steps") or 0
    return

  def lr(start, end):  # the lr of the first step after the resume
    return float(optim.schedule(cfg.optim, end, start=start)(resume_step))

  then, stretched = lr(old_start, old_end), lr(old_start, cfg.train.steps)
  restarted = lr(resume_step, cfg.train.steps)
  nxt = resume_step + 1
  if choice is None:
    raise errors.ResumeError(
        f"train.steps: was {old_steps}, now {cfg.train.steps}, which changes "
        f"the learning-rate schedule (lr of step {nxt}: {then:.3e} kept, "
        f"{stretched:.3e} stretched, {restarted:.3e} restarted); choose "
        "--schedule-on-resume keep (continue the original schedule), stretch "
        "(recompute it over the new length) or restart (warmup and decay "
        "again from here)")
  cfg.optim.schedule_start = old_start
  if choice == "keep":
    cfg.optim.schedule_steps = old_end
    end = float(optim.schedule(cfg.optim, old_end, start=old_start)(old_end))
    write(f"schedule kept: lr of step {nxt} {then:.3e}; the original "
          f"schedule ends at step {old_end}, after which the lr stays "
          f"{end:.3e}")
  elif choice == "stretch":
    cfg.optim.schedule_steps = 0
    write(f"schedule stretched to {cfg.train.steps} steps: lr of step {nxt} "
          f"{then:.3e} -> {stretched:.3e}")
  else:
    cfg.optim.schedule_start, cfg.optim.schedule_steps = resume_step, 0
    write(f"schedule restarted at step {resume_step} (warmup, then decay to "
          f"step {cfg.train.steps}): lr of step {nxt} {then:.3e} -> "
          f"{restarted:.3e}")
