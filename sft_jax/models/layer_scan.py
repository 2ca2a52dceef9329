"""The layer stack scanned in groups of one attention pattern.

Layers differ in their sliding window (Gemma-2 alternates sliding and global
layers, Gemma-3 has five local layers to one global, Qwen's max_window_layers
splits the stack in two). A kernel such as splash's LocalMask or cuDNN needs
the window as a static Python int, and a layer should compile only its own
pattern, so the stack is cut into pieces of one static period:

  piece = (windows of one period P, groups k): layers [s, s + k*P) with
          layer s + g*P + p having window windows[p]

Each piece is a scan over its k groups; the body runs the P layers of one
group unrolled, each with its static window. A uniform stack is one piece
with P = 1; Gemma-2 one piece with P = 2; Gemma-3 (26 layers) P = 6, k = 4
and the 2 layers left over as a second piece; Qwen's prefix/suffix split two
pieces with P = 1 (`scan_plan`).

The params tree is unchanged: every leaf stays stacked [L, ...] under the
stack's scope ("layers" or "frozen_layers"). nn.map_variables gives the
pieces a view of it. A run over the whole stack (a uniform model) scans the
stack as it is, as before. Every other piece scans its groups with the
whole stack as a loop-invariant operand, and layer p of group g reads its
row (dynamic_slice) inside its remat, whose policy never saves that slice
(see _group_policy): no slice of the stack is copied, and no stacked copy
of the weights is kept as scan residuals. (Init builds the same tree
through [k, P, ...] views.) The view's scopes ("_scan<i>", "_layer<p>")
never reach the params tree; `logical_path` drops them from module paths
(LoRA targets match "layers/attn/q_proj").
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.models import remat as remat_lib

_SCAN, _LAYER = "_scan", "_layer"
Plan = tuple[tuple[tuple[int, ...], int], ...]


def logical_path(path: Sequence[str]) -> str:
  """"/"-joined module path without the stack's view scopes."""
  return "/".join(p for p in path
                  if not (p.startswith(_SCAN) or p.startswith(_LAYER)))


def _runs(windows: Sequence[int]) -> list[tuple[tuple[int, ...], int]]:
  out = []
  for w in windows:
    if out and out[-1][0] == (w,):
      out[-1] = ((w,), out[-1][1] + 1)
    else:
      out.append(((int(w),), 1))
  return out


def scan_plan(windows: Sequence[int]) -> Plan:
  """Pieces ((window per period position), groups) covering `windows` in order.

  Chooses the cover with the fewest layer bodies to compile (sum of the
  periods), then the fewest loops: runs of one window each, or a period P
  that repeats at least twice from the first layer followed by runs for the
  remainder.
  """
  windows = [int(w) for w in windows]
  n = len(windows)

  def cost(plan):  # layer bodies to compile, then loops
    return sum(len(period) for period, _ in plan), len(plan)

  best = _runs(windows)
  for period in range(2, n // 2 + 1):
    k = n // period
    if any(windows[i] != windows[i % period] for i in range(k * period)):
      continue
    cand = [(tuple(windows[:period]), k)] + _runs(windows[k * period:])
    if cost(cand) < cost(best):
      best = cand
  return tuple(best)


def _rows(x, start, size):
  """x[start:start + size]; x itself when that is all of it (no copy)."""
  return x if (start, size) == (0, x.shape[0]) else x[start:start + size]


def _indexed(plan: Plan, i: int) -> bool:
  """Whether piece i reads its layers by index from the whole stack.

  Every piece but a run over the whole stack: no slice of the stack is
  copied, and each layer reads only its own weights.
  """
  return not (len(plan) == 1 and len(plan[0][0]) == 1)


def _to_view(plan: Plan, init: bool, stacked: dict) -> dict:
  """{collection: [n, ...] tree} -> {collection: {_scan<i>: piece}}.

  A piece is [k, P, ...], or [k, ...] when P = 1 (a run: the stack's own
  layout, as a plain scan over layers). Applying, an indexed piece (see
  _indexed) gets the whole stack for each of its layers instead.
  """
  out = {}
  for col, tree in stacked.items():
    view, start = {}, 0
    for i, (period, groups) in enumerate(plan):
      p = len(period)
      if not init and _indexed(plan, i):
        view[f"{_SCAN}{i}"] = {f"{_LAYER}{j}": tree for j in range(p)}
        start += groups * p
        continue
      shape = (groups, p) if p > 1 else (groups,)
      view[f"{_SCAN}{i}"] = jax.tree.map(
          lambda x, s=start, n=groups * p, shape=shape: _rows(
              x, s, n).reshape(shape + x.shape[1:]), tree)
      start += groups * p
    out[col] = view
  return out


def _from_view(plan: Plan, view: dict) -> dict:
  """Inverse of _to_view (init: the created variables back to [n, ...])."""
  out = {}
  for col, pieces in view.items():
    if not pieces:
      out[col] = pieces
      continue
    parts = [pieces[f"{_SCAN}{i}"] for i in range(len(plan))]
    flat = [len(period) > 1 for period, _ in plan]
    out[col] = jax.tree.map(
        lambda *xs: jnp.concatenate(
            [x.reshape((-1,) + x.shape[2:]) if f else x
             for x, f in zip(xs, flat)]), *parts)
  return out


# A layer reads its row of the stack inside its remat (checkpoint), and the
# policy never saves a slice: the backward pass reads the row again instead
# of the forward saving a stacked copy of every layer's weights as
# residuals.
_SLICES = (jax.lax.slice_p, jax.lax.squeeze_p, jax.lax.dynamic_slice_p)


def _group_view(period: int, group: dict) -> dict:
  """Init: {collection: [P, ...] tree} -> {collection: {_layer<p>: [p]}}."""
  return {col: {f"{_LAYER}{p}": jax.tree.map(lambda x, p=p: x[p], tree)
                for p in range(period)}
          for col, tree in group.items()}


def _group_unview(period: int, view: dict) -> dict:
  return {col: jax.tree.map(lambda *xs: jnp.stack(xs),
                            *[layers[f"{_LAYER}{p}"] for p in range(period)])
          for col, layers in view.items()}


def _row_of_stack(row, variables: dict) -> dict:
  def take(x):
    x = jax.lax.dynamic_slice(x, (row,) + (0,) * (x.ndim - 1),
                              (1,) + x.shape[1:])
    return jax.lax.squeeze(x, (0,))
  return {col: jax.tree.map(take, tree) for col, tree in variables.items()}


def _group_policy(remat: str):
  """The remat policy of a layer in a group: `remat`, never its params.

  The named and dot policies save no slice already; "none" (and
  everything_saveable) become "everything but slices" (cheap to redo).
  """
  if remat in ("none", "everything_saveable"):
    return lambda prim, *_, **__: prim not in _SLICES
  return remat_lib.policy(remat)


_COLLECTIONS = ("params", "lora")


class _GroupBody(nn.Module):
  """Init only: the P layers of one group, each with its own params."""
  block: Any  # module class: block(cfg, window, name=...)
  cfg: Any
  windows: tuple[int, ...]

  def layer_module(self, layer):
    del layer
    return self.block

  @nn.compact
  def __call__(self, carry, layer_P, *broadcast):
    for p, window in enumerate(self.windows):
      layer = jax.tree.map(lambda a, p=p: a[p], layer_P)
      carry, _ = self.layer_module(layer)(self.cfg, window,
                                          name=f"{_LAYER}{p}")(
                                              carry, layer, *broadcast)
    return carry, None


class _IndexedBody(_GroupBody):
  """One group's P layers, each reading its row of the whole stack.

  The stack is a loop-invariant operand (no slice is copied); the row is
  read inside the layer's remat, whose policy never saves it.
  """

  def layer_module(self, layer):
    block = nn.map_variables(
        self.block, _COLLECTIONS,
        trans_in_fn=functools.partial(_row_of_stack, layer["row"]))
    return nn.remat(block, prevent_cse=False,
                    policy=_group_policy(self.cfg.remat))


class _StackBody(nn.Module):
  """Every piece of the plan, in order, over its view of the stack."""
  block: Any
  cfg: Any
  plan: Plan
  unroll: bool

  @nn.compact
  def __call__(self, carry, layer_inputs, *broadcast):
    start, init = 0, self.is_initializing()
    total = sum(len(w) * k for w, k in self.plan)
    layer_inputs = dict(layer_inputs, row=jnp.arange(total, dtype=jnp.int32))
    for i, (windows, groups) in enumerate(self.plan):
      p = len(windows)
      shape = (groups, p) if p > 1 else (groups,)
      inputs = jax.tree.map(
          lambda a, s=start, n=groups * p, shape=shape: a[s:s + n].reshape(
              shape + a.shape[1:]), layer_inputs)
      if not init and _indexed(self.plan, i):
        if p == 1:
          inputs = jax.tree.map(lambda a: a[:, None], inputs)
        scan = nn.scan(
            _IndexedBody, variable_broadcast=_COLLECTIONS,
            split_rngs={"dropout": True},
            in_axes=(0,) + (nn.broadcast,) * len(broadcast),
            length=groups, unroll=groups if self.unroll else 1)
        carry, _ = scan(self.block, self.cfg, windows, name=f"{_SCAN}{i}")(
            carry, inputs, *broadcast)
        start += groups * p
        continue
      if p == 1:  # A run: layers scanned one by one, as a uniform stack.
        body, args = self.block, (self.cfg, windows[0])
        if self.cfg.remat != "none":
          body = nn.remat(body, prevent_cse=False,
                          policy=remat_lib.policy(self.cfg.remat))
      else:
        body = nn.map_variables(
            _GroupBody, _COLLECTIONS,
            trans_in_fn=functools.partial(_group_view, p),
            trans_out_fn=functools.partial(_group_unview, p), init=init)
        args = (self.block, self.cfg, windows)
      scan = nn.scan(
          body, variable_axes={c: 0 for c in _COLLECTIONS},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0,) + (nn.broadcast,) * len(broadcast),
          length=groups, unroll=groups if self.unroll else 1)
      carry, _ = scan(*args, name=f"{_SCAN}{i}")(carry, inputs, *broadcast)
      start += groups * p
    return carry


def layer_stack(block, cfg, windows: Sequence[int], *, unroll: bool,
                name: str, init: bool):
  """The stack module over [len(windows), ...] params under scope `name`.

  Call it as stack(carry, layer_inputs, *broadcast): `block` (a module class,
  remat per cfg.remat here) is called as block(cfg, window, name=...)(carry,
  layer, *broadcast) -> (carry, None); layer_inputs are [n, ...] per-layer
  arrays (layer gets one row).
  """
  plan = scan_plan(windows)
  mapped = nn.map_variables(
      _StackBody, _COLLECTIONS,
      trans_in_fn=functools.partial(_to_view, plan, init),
      trans_out_fn=lambda v: _from_view(plan, v), init=init)
  return mapped(block, cfg, plan, unroll, name=name)
