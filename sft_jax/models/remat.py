"""Named activation checkpoints in the decoder layer and the remat policies.

The layer tags its intermediates with jax.ad_checkpoint.checkpoint_name, so
a policy can say which to keep for the backward pass and which to recompute
(or move to host memory). The names follow MaxText's:

  decoder_layer_input   the residual stream entering the layer
  query_proj, key_proj, value_proj   q/k/v after projection (before rotary)
  context               the attention output before o_proj
  out_proj              o_proj's output
  mlpwi_0, mlpwi_1      gate and up projections
  mlpwo                 down projection's output

Policies, from most memory (least recompute) to least:

  none                  no remat: XLA keeps whatever the backward needs
  minimal_with_context  save every named matmul output and `context`
  minimal               save every named matmul output
  save_dot_except_mlp   save q/k/v, context and out_proj; recompute the MLP
  save_qkv_proj         save q/k/v only
  save_out_proj         save out_proj only
  full                  save only the layer input: recompute the layer
  *_offloaded           as above, but the saved tensors live in host memory
                        (platforms with a "pinned_host" memory space)
plus jax's generic ones (dots_saveable, dots_with_no_batch_dims_saveable,
nothing_saveable, everything_saveable).

A layer of a periodic group (layer_scan.py) is always checkpointed, because
it slices its weights out of the group's inside the checkpoint; there "none"
(and everything_saveable) save everything but those slices.
"""

import jax

LAYER_INPUT = "decoder_layer_input"
QKV = ("query_proj", "key_proj", "value_proj")
CONTEXT = "context"
OUT_PROJ = "out_proj"
MLP = ("mlpwi_0", "mlpwi_1", "mlpwo")

_SAVED = {
    "minimal_with_context": QKV + (CONTEXT, OUT_PROJ) + MLP,
    "minimal": QKV + (OUT_PROJ,) + MLP,
    "save_dot_except_mlp": QKV + (CONTEXT, OUT_PROJ),
    "save_qkv_proj": QKV,
    "save_out_proj": (OUT_PROJ,),
}
_OFFLOADED = {"qkv_proj_offloaded": QKV,
              "minimal_offloaded": QKV + (OUT_PROJ,) + MLP,
              "layer_input_offloaded": (LAYER_INPUT,)}
_GENERIC = ("dots_saveable", "dots_with_no_batch_dims_saveable",
            "nothing_saveable", "everything_saveable")

POLICIES = (("none", "full") + tuple(_SAVED) + tuple(_OFFLOADED) + _GENERIC)


def host_offload_supported() -> bool:
  """Whether the default device can move tensors to pinned host memory."""
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  return "pinned_host" in kinds


def policy(name: str):
  """The jax.checkpoint policy of `name`; None for "full" (save nothing)."""
  if name not in POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; use one of "
                     f"{', '.join(POLICIES)}")
  if name == "none":
    raise ValueError("remat 'none' has no policy (the layer is not wrapped)")
  if name == "full":
    return None
  cp = jax.checkpoint_policies
  if name in _SAVED:
    return cp.save_only_these_names(*_SAVED[name])
  if name in _OFFLOADED:
    if not host_offload_supported():
      raise ValueError(f"remat policy {name!r} offloads to host memory, "
                       f"which {jax.devices()[0].platform} does not offer")
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(_OFFLOADED[name]),
        offload_src="device", offload_dst="pinned_host")
  return getattr(cp, name)
