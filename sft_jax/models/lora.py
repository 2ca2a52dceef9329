"""LoRA: merging into the kernels, and PEFT adapter tensors in and out.

The "lora" collection mirrors the params tree at the targeted modules:
lora["layers"]["attn"]["q_proj"] = {"a": [L, in, R], "b": [L, R, out]},
and the adapted kernel is kernel + scale * a @ b. PEFT stores, per layer,
lora_A.weight = a[l].T [R, in] and lora_B.weight = b[l].T [out, R] under the
HF module name `tables.hf_module_name(path, l, model_type)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models import tables
from sft_jax.models.config import ModelConfig
from sft_jax.models.errors import (CheckpointError, MissingTensorError,
                                   ShapeMismatchError, UnexpectedTensorError)

_PEFT_PREFIX = "base_model.model."


def lora_modules(lora) -> dict[str, dict]:
  """{"layers/attn/q_proj": {"a": ..., "b": ...}, ...} from a lora tree."""
  out = {}

  def walk(node, path):
    if "a" in node and "b" in node and not isinstance(node["a"], dict):
      out["/".join(path)] = node
      return
    for key, child in node.items():
      walk(child, path + (key,))

  walk(lora, ())
  return out


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _with_kernel(params, path, kernel):
  """A copy of `params` (sharing untouched leaves) with a new kernel."""
  keys = path.split("/")

  def rebuild(node, depth):
    node = dict(node)
    if depth == len(keys):
      node["kernel"] = kernel
      return node
    node[keys[depth]] = rebuild(node[keys[depth]], depth + 1)
    return node

  return rebuild(params, 0)


@functools.partial(jax.jit, static_argnums=2)
def merge_lora(params, lora, cfg: ModelConfig):
  """params with every adapted kernel replaced by kernel + scale * a @ b.

  Computed in float32, stored in the kernel's dtype; jitted. Use the
  result with `dataclasses.replace(cfg, lora=None)`.
  """
  if cfg.lora is None:
    raise ValueError("merge_lora: cfg.lora is None")
  for path, ab in lora_modules(lora).items():
    kernel = _get(params, path)["kernel"]
    delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                       ab["b"].astype(jnp.float32))
    merged = kernel.astype(jnp.float32) + cfg.lora.scale * delta
    params = _with_kernel(params, path, merged.astype(kernel.dtype))
  return params


def peft_tensors(lora, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """PEFT adapter_model.safetensors contents for a lora tree."""
  out = {}
  for path, ab in lora_modules(lora).items():
    a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
    for layer in range(a.shape[0]):
      name = _PEFT_PREFIX + tables.hf_module_name(path, layer, cfg.model_type)
      out[name + ".lora_A.weight"] = np.ascontiguousarray(a[layer].T)
      out[name + ".lora_B.weight"] = np.ascontiguousarray(b[layer].T)
  return out


def peft_config(lora, cfg: ModelConfig, base_model: str = "") -> dict:
  """adapter_config.json contents matching `peft_tensors`."""
  modules = sorted({path.rsplit("/", 1)[-1] for path in lora_modules(lora)})
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model, "r": cfg.lora.rank,
      "lora_alpha": cfg.lora.alpha, "use_rslora": cfg.lora.rslora,
      "target_modules": modules, "lora_dropout": cfg.lora.dropout, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True,
  }


def lora_from_peft(tensors: dict[str, np.ndarray], cfg: ModelConfig,
                   lora_shapes, source: str = "adapter"):
  """A lora tree from PEFT tensors.

  Args:
    tensors: name -> array, as in adapter_model.safetensors.
    cfg: config with cfg.lora set (rank must match the tensors).
    lora_shapes: the expected tree, e.g. `init(cfg, rng)["lora"]` under
      jax.eval_shape.
    source: named in error messages.
  """
  tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
  used, out = set(), {}
  for path, ab in lora_modules(lora_shapes).items():
    stacks = {}
    for key, suffix in (("a", "lora_A.weight"), ("b", "lora_B.weight")):
      want = ab[key].shape
      rows = []
      for layer in range(want[0]):
        name = (_PEFT_PREFIX + tables.hf_module_name(path, layer,
                                                     cfg.model_type)
                + "." + suffix)
        if name not in tensors:
          raise MissingTensorError(f"{source}: missing tensor {name}")
        x = np.asarray(tensors[name]).T
        if x.shape != tuple(want[1:]):
          raise ShapeMismatchError(
              f"{source}: tensor {name} has shape {x.shape[::-1]}, expected "
              f"{tuple(want[1:])[::-1]}")
        rows.append(x)
        used.add(name)
      stacks[key] = jnp.asarray(np.stack(rows), ab[key].dtype)
    out[path] = stacks
  extra = sorted(set(tensors) - used)
  if extra:
    raise UnexpectedTensorError(f"{source}: unexpected tensors {extra[:5]}")
  if not out:
    raise CheckpointError(f"{source}: cfg.lora targets no module")
  tree = {}
  for path, ab in out.items():
    node = tree
    for key in path.split("/"):
      node = node.setdefault(key, {})
    node.update(ab)
  return tree
