"""Checks of model and tokenizer sources before anything heavy is loaded.

Each check raises a `UserError` naming the file (or config key) at fault, so
a missing directory, a truncated safetensors file or a corrupt config.json is
one clear line instead of a loader's traceback.

`model_fingerprint(path)` identifies a base model's content cheaply (config,
safetensors headers and a sample of the weight bytes), so a resumed run can
refuse to continue on another base of the same shapes.
"""

import glob
import hashlib
import json
import os
import re
import struct

from sft_jax import errors

# "org/name" or "name": what the hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Bytes hashed per safetensors file besides its header: evenly spaced chunks.
_SAMPLES, _CHUNK = 16, 1 << 16


def _looks_local(path: str) -> bool:
  return (os.path.isabs(path) or path.startswith((".", "~")) or
          os.path.exists(os.path.expanduser(path)) or
          not _HUB_ID.match(path))


def check_safetensors(path: str, what: str = "model") -> dict:
  """Reads a safetensors header; raises UserError if the file is cut short.

  Returns the header (tensor name -> {dtype, shape, data_offsets}).
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise errors.UserError(f"{path}: truncated ({size} bytes, no header); "
                             "the file is incomplete: download it again",
                             what=what)
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise errors.UserError(
          f"{path}: truncated ({size} bytes; its header alone needs "
          f"{8 + n}); the file is incomplete: download it again", what=what)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise errors.UserError(f"{path}: not a safetensors file (unreadable "
                             "header); the file is corrupt", what=what) from None
  end = max([v["data_offsets"][1] for k, v in header.items()
             if k != "__metadata__"] or [0])
  if 8 + n + end > size:
    raise errors.UserError(
        f"{path}: truncated ({size:,} bytes, its tensors need "
        f"{8 + n + end:,}); the file is incomplete: download it again",
        what=what)
  return header


def _local_path(path: str) -> str | None:
  """The expanded local path a setting names; None for "" or a hub id."""
  return os.path.expanduser(path) if path and _looks_local(path) else None


def check_model_dir(path: str, key: str = "model.path",
                    what: str = "model") -> None:
  """A local HF checkpoint directory: it exists, config.json parses, every
  safetensors file is complete. Hub ids pass (the hub client checks them)."""
  local = _local_path(path)
  if local is None:
    return
  if not os.path.exists(local):
    raise errors.UserError(
        f"{key}={path}: no such directory; give an HF checkpoint directory "
        "(with config.json and *.safetensors) or a hub id (org/name)",
        what=what)
  if not os.path.isdir(local):
    raise errors.UserError(f"{key}={path}: is a file; give the checkpoint's "
                           "directory", what=what)
  config = os.path.join(local, "config.json")
  if not os.path.exists(config):
    raise errors.UserError(f"{config}: missing; {path} is not an HF "
                           "checkpoint directory", what=what)
  cfg = errors.read_json(config, what=what)
  if not isinstance(cfg, dict):
    raise errors.UserError(f"{config}: expected a JSON object, got "
                           f"{type(cfg).__name__}", what=what)
  for f in sorted(glob.glob(os.path.join(local, "*.safetensors"))):
    check_safetensors(f, what=what)


def check_tokenizer_source(path: str, key: str) -> None:
  """A local tokenizer directory exists (hub ids are left to the hub)."""
  local = _local_path(path)
  if local is None:
    return
  if not os.path.isdir(local):
    raise errors.UserError(
        f"{key}={path}: no such directory; give a tokenizer directory or a "
        "hub id (org/name)", what="tokenizer")


def resolve_hub_dir(path: str) -> str | None:
  """The local snapshot directory of a hub id, if it is in the cache."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(path, local_files_only=True)
  except Exception:  # pylint: disable=broad-except
    return None


def model_fingerprint(path: str) -> str:
  """A hash of a base model's content: config.json, every safetensors header
  and evenly spaced samples of its weight bytes (fast on 10+ GB files, and
  two bases of the same shapes differ in the samples)."""
  local = os.path.expanduser(path)
  if not os.path.isdir(local):
    local = resolve_hub_dir(path)
    if local is None:
      return "hub:" + path
  h = hashlib.sha256()
  names = ["config.json"] + sorted(
      os.path.basename(f)
      for f in glob.glob(os.path.join(local, "*.safetensors")))
  for name in names:
    file = os.path.join(local, name)
    if not os.path.exists(file):
      continue
    size = os.path.getsize(file)
    h.update(f"{name}:{size}\n".encode())
    with open(file, "rb") as f:
      if name == "config.json" or size <= _SAMPLES * _CHUNK:
        h.update(f.read())
        continue
      for i in range(_SAMPLES):
        f.seek(i * (size - _CHUNK) // (_SAMPLES - 1))
        h.update(f.read(_CHUNK))
  return h.hexdigest()[:16]
