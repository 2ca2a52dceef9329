"""Errors raised while reading or writing checkpoints; each message names the
file (and tensor) at fault."""

from sft_jax import errors


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint cannot be loaded or saved as asked."""
  what = "model"


class UnsupportedModelError(CheckpointError):
  """config.json describes a model this package cannot run exactly."""


class MissingTensorError(CheckpointError):
  """The config implies a tensor that no safetensors file holds."""


class UnexpectedTensorError(CheckpointError):
  """A safetensors file holds a tensor the config does not explain."""


class ShapeMismatchError(CheckpointError):
  """A tensor's stored shape differs from the shape config.json implies."""
