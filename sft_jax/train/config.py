"""Python config files, `--config.KEY=VALUE` overrides and the saved config.

A config file is a Python module with `get_config(arg=None)` returning an
`ml_collections.ConfigDict`; `configs/base.py` declares every key with a
comment and each experiment forks it. `arg` is a short string of knobs
(`"method=lora,steps=20"`) that a file fans out to several keys.

  cfg = load_config("configs/tiny.py:method=lora", ["--config.optim.lr=1e-3"])

The returned config is locked: an override of a key that does not exist, or
with a value of the wrong type, raises `ConfigError` naming the key.
"""

import ast
import difflib
import importlib.util
import json
import os
import pathlib
import types
from typing import Any, Sequence

from ml_collections import config_dict

from sft_jax import errors

ConfigDict = config_dict.ConfigDict

# The repository root: `configs/...` resolves here when not found from cwd.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class ConfigError(errors.UserError, ValueError):
  """A config file, knob or override is wrong; the message names the key."""
  what = "config"


def parse_arg(arg: str | None, **defaults) -> types.SimpleNamespace:
  """Parses a config file's `arg` string `"k=v,k2=v2"` against `defaults`.

  Each value is converted to the type of its default; a knob that is not in
  `defaults` is an error naming it. Returns a namespace of all knobs.
  """
  knobs = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ConfigError(f"config arg {item!r}: expected KEY=VALUE")
    if key not in defaults:
      raise ConfigError(f"unknown config arg {key!r}; known: "
                        f"{', '.join(sorted(defaults))}")
    knobs[key] = _parse_value(f"arg {key}", value.strip(), type(defaults[key]))
  return types.SimpleNamespace(**knobs)


def _resolve(path: str) -> pathlib.Path:
  for candidate in (pathlib.Path(path), _REPO_ROOT / path):
    if candidate.is_file():
      return candidate
  raise ConfigError(f"config file {path!r} not found (looked in "
                    f"{os.getcwd()} and {_REPO_ROOT})")


def import_file(path) -> types.ModuleType:
  """Imports a Python file by path (config files are not a package)."""
  file = _resolve(str(path))
  module_spec = importlib.util.spec_from_file_location(
      f"_sft_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}"
                      ) from None
  except (ConfigError, errors.UserError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{_user_frame(e, file)}: importing the config raised "
                      f"{type(e).__name__}: {e}") from None
  return module


def _user_frame(exc: BaseException, file) -> str:
  """`file:line` of the innermost traceback frame inside the config file."""
  import traceback  # pylint: disable=g-import-not-at-top
  place = str(file)
  for frame in traceback.extract_tb(exc.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(str(file)):
      place = f"{frame.filename}:{frame.lineno}"
  return place


def get_config_from_file(spec: str) -> ConfigDict:
  """Runs `get_config(arg)` of `path.py[:arg]`; the result is not locked."""
  path, _, arg = spec.partition(":")
  file = _resolve(path)
  module = import_file(file)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{file}: no get_config(arg) function")
  try:
    cfg = module.get_config(arg or None)
  except (ConfigError, errors.UserError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{_user_frame(e, file)}: get_config raised "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(cfg, ConfigDict):
    raise ConfigError(f"{file}: get_config returned {type(cfg).__name__}, "
                      "expected ml_collections.ConfigDict")
  return cfg


def _parse_value(key: str, text: str, kind: type) -> Any:
  """Converts override text to `kind`; raises ConfigError naming `key`."""
  try:
    if kind is bool:
      lowered = text.lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError("expected true or false")
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
    if kind in (tuple, list):
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = tuple(s.strip() for s in text.split(",") if s.strip())
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return kind(value)
  except ValueError as e:
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as "
                      f"{kind.__name__} ({e})") from None
  raise ConfigError(f"config key {key!r} has type {kind.__name__}, which "
                    "cannot be set from the command line")


def _all_keys(cfg: ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ConfigDict):
      keys += _all_keys(v, f"{prefix}{k}.")
  return keys


def set_override(cfg: ConfigDict, key: str, text: str) -> None:
  """Sets dotted `key` of `cfg` from string `text`, parsed by the key's type."""
  *parents, leaf = key.split(".")
  node = cfg
  for i, name in enumerate(parents + [leaf]):
    if not isinstance(node, ConfigDict) or name not in node:
      close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config key {key!r}{hint}")
    if i < len(parents):
      node = node[name]
  if isinstance(node[leaf], ConfigDict):
    raise ConfigError(f"config key {key!r} is a section; set one of its keys")
  kind = node.get_type(leaf)
  value = _parse_value(key, text, kind)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config key {key!r}: {e}") from None


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """`["--config.a.b=1", "--config.c", "x"]` -> `[("a.b", "1"), ("c", "x")]`."""
  pairs, i = [], 0
  argv = list(argv)
  while i < len(argv):
    item = argv[i]
    if not item.startswith("--config."):
      raise ConfigError(f"expected --config.KEY=VALUE, got {item!r}")
    key, sep, value = item[len("--config."):].partition("=")
    if not sep:
      if i + 1 >= len(argv):
        raise ConfigError(f"config key {key!r}: missing value")
      value, i = argv[i + 1], i + 1
    pairs.append((key, value))
    i += 1
  return pairs


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` from other args."""
  overrides, rest, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    if argv[i].startswith("--config."):
      overrides.append(argv[i])
      if "=" not in argv[i] and i + 1 < len(argv):
        overrides.append(argv[i + 1])
        i += 1
    else:
      rest.append(argv[i])
    i += 1
  return overrides, rest


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Builds `path.py[:arg]`, applies `--config.KEY=VALUE` overrides, locks."""
  cfg = get_config_from_file(spec)
  cfg.lock()
  for key, text in parse_overrides(overrides):
    set_override(cfg, key, text)
  return cfg


def config_to_dict(cfg: ConfigDict) -> dict:
  """The config as plain JSON-able nested dicts (tuples become lists)."""
  return json.loads(cfg.to_json())


def flatten_config(cfg: ConfigDict) -> dict[str, Any]:
  """`{"optim.lr": 1e-5, ...}` with scalar leaves; sequences as strings."""
  flat = {}

  def visit(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        visit(v, f"{prefix}{k}.")
      elif isinstance(v, list):
        flat[prefix + k] = json.dumps(v)
      else:
        flat[prefix + k] = v

  visit(config_to_dict(cfg), "")
  return flat


def save_config(cfg: ConfigDict, path) -> None:
  """Writes the resolved config as indented JSON."""
  pathlib.Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2) +
                                "\n")


def _tuplify(value):
  if isinstance(value, dict):
    return {k: _tuplify(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  return value


def config_from_dict(d: dict) -> ConfigDict:
  """A locked config from `config_to_dict`'s output (lists back to tuples)."""
  cfg = ConfigDict(_tuplify(d))
  cfg.lock()
  return cfg


def config_from_json(path) -> ConfigDict:
  """Reads a config saved by `save_config` back, locked (lists as tuples)."""
  with open(path) as f:
    return config_from_dict(json.load(f))
