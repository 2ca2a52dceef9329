"""Path-regex rules over parameter trees: one helper for every role.

A leaf's path is its dict keys joined by "/", e.g. "layers/attn/q_proj/kernel"
(paths inside one collection) or "params/layers/attn/q_proj/kernel" (a
variables dict). Rules are Python regexes searched (`re.search`) in the path,
so "norm" matches every norm scale and "^embed" only the embedding.

Trees here are plain nested dicts; a split keeps the nesting of each part and
drops empty branches, so `merge(*split(tree, pred)) == tree`.
"""

import re
from typing import Any, Callable

from flax import traverse_util

Tree = dict[str, Any]


def path_str(path: tuple) -> str:
  """("params", "layers", "kernel") -> "params/layers/kernel"."""
  return "/".join(str(getattr(p, "key", p)) for p in path)


def flat(tree: Tree) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  return {path_str(k): v for k, v in
          traverse_util.flatten_dict(tree, keep_empty_nodes=False).items()}


def unflat(flat_tree: dict[str, Any]) -> Tree:
  """{"a/b": x} -> {"a": {"b": x}}."""
  return traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in flat_tree.items()})


def matches(tree: Tree, regex: str) -> dict[str, bool]:
  """{path: bool} for every leaf: whether `regex` is found in its path."""
  pattern = re.compile(regex)
  return {p: bool(pattern.search(p)) for p in flat(tree)}


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
  """Applies fn(path, leaf) to every leaf, keeping the nesting."""
  return unflat({p: fn(p, v) for p, v in flat(tree).items()})


def mask(tree: Tree, regex: str) -> Tree:
  """A tree of bools like `tree`: True where `regex` matches the path."""
  return unflat(matches(tree, regex))


def split(tree: Tree, regex: str) -> tuple[Tree, Tree]:
  """(leaves whose path matches `regex`, the rest), each a nested dict."""
  hit = matches(tree, regex)
  leaves = flat(tree)
  return (unflat({p: v for p, v in leaves.items() if hit[p]}),
          unflat({p: v for p, v in leaves.items() if not hit[p]}))


def merge(*trees: Tree) -> Tree:
  """Union of disjoint nested dicts (the inverse of `split`)."""
  out = {}
  for tree in trees:
    for p, v in flat(tree).items():
      if p in out:
        raise ValueError(f"merge: leaf {p!r} is in more than one tree")
      out[p] = v
  return unflat(out)
