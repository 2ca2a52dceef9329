"""models.load_hf refuses a broken checkpoint with one clear error.

Each test saves a tiny transformers checkpoint, breaks one thing (its
config, a tensor, its format) and checks the error names the file and the
reason.
"""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from sft_jax import models
import tiny_hf


def _checkpoint(family, tmp_path):
  """A tiny single-file fp32 checkpoint of `family` to break."""
  return tiny_hf.make_tiny_hf(family, str(tmp_path / "m"))


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as fh:
    config = json.load(fh)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)


def _edit_tensors(path, fn):
  file = os.path.join(path, "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  fn(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_unknown_model_type(tmp_path):
  path = _checkpoint("llama", tmp_path)
  _edit_config(path, model_type="gpt2")
  with pytest.raises(models.UnsupportedModelError,
                     match=r"config\.json: model_type 'gpt2'"):
    models.load_hf(path)


def test_missing_tensor(tmp_path):
  path = _checkpoint("llama", tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(path, lambda t: t.pop(name))
  with pytest.raises(models.MissingTensorError, match=name.replace(".", r"\.")):
    models.load_hf(path)


def test_unexpected_tensor(tmp_path):
  path = _checkpoint("qwen3", tmp_path)
  name = "model.layers.0.self_attn.q_proj.bias"  # qwen3: no attention_bias
  _edit_tensors(path, lambda t: t.update({name: np.zeros(64, np.float32)}))
  with pytest.raises(models.UnexpectedTensorError,
                     match=r"model\.safetensors: unexpected tensor "
                     + name.replace(".", r"\.")):
    models.load_hf(path)


def test_shape_mismatch(tmp_path):
  path = _checkpoint("mistral", tmp_path)
  _edit_config(path, intermediate_size=40)
  with pytest.raises(models.ShapeMismatchError,
                     match=r"model\.safetensors: tensor model\.layers\.0\."
                     r"mlp\.\w+_proj\.weight has shape \((48, 32|32, 48)\), "
                     r".*config\.json implies"):
    models.load_hf(path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
  path = _checkpoint("llama", tmp_path)
  os.rename(os.path.join(path, "model.safetensors"),
            os.path.join(path, "pytorch_model.bin"))
  with pytest.raises(models.CheckpointError, match="only safetensors"):
    models.load_hf(path)


def test_offline_hub_id_gives_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(models.CheckpointError,
                     match="no-such-org/no-such-model: not a local directory"):
    models.load_hf("no-such-org/no-such-model")
