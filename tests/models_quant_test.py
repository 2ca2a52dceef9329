"""NF4 / int8 block quantization of a frozen base (sft_jax/models/quant.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sft_jax.models import quant


def test_nf4_code_book_is_qloras():
  # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True):
  # 8 positive and 7 negative normal quantiles and a zero, scaled to [-1, 1].
  offset = 0.9677083
  pos = stats.norm.ppf(np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1])
  neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1])
  levels = np.sort(np.concatenate([pos, [0.0], neg]))
  np.testing.assert_allclose(quant.NF4, levels / levels.max(), atol=1e-6)
  assert quant.NF4[7] == 0.0 and quant.NF4[0] == -1.0 and quant.NF4[-1] == 1.0


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_round_trip_and_error_bound(fmt):
  w = jax.random.normal(jax.random.key(0), (2, 128, 24)) * 0.05
  q = quant.quantize(w, fmt, 32)
  want_codes = (2, 64, 24) if fmt == "nf4" else (2, 128, 24)
  assert q["codes"].shape == want_codes and q["scale"].shape == (2, 4, 24)
  d = np.asarray(quant.dequantize(q))
  # Each weight lands on its nearest level: within half the widest gap of
  # the code book, in units of its block's absmax.
  gap = np.max(np.diff(quant.NF4)) / 2 if fmt == "nf4" else 0.5 / 127
  scale = np.repeat(np.asarray(q["scale"]), 32, axis=1)
  assert np.all(np.abs(d - np.asarray(w)) <= gap * scale * (1 + 1e-6))
  # The absmax of each block is exact, and re-quantizing is the identity.
  np.testing.assert_allclose(np.abs(d).reshape(2, 4, 32, 24).max(2),
                             q["scale"], rtol=1e-6)
  q2 = quant.quantize(jnp.asarray(d), fmt, 32)
  np.testing.assert_array_equal(q2["codes"], q["codes"])


def test_bytes_per_weight():
  w = jnp.zeros((1024, 256), jnp.bfloat16)
  for fmt, want in (("nf4", 0.5 + 4 / 64), ("int8", 1 + 4 / 64)):
    q = quant.quantize(w, fmt, 64)
    nbytes = sum(x.nbytes for x in q.values())
    assert nbytes / w.size == want
  assert (0.5 + 4 / 64) / 2 <= 0.3  # nf4 against bf16


def test_bad_block_is_one_clear_error():
  with pytest.raises(ValueError, match="block 48 does not divide the 64"):
    quant.quantize(jnp.zeros((64, 8)), "nf4", 48)


def test_qlora_block_size_is_checked_against_the_model():
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py:method=qlora",
                               ["--config.method.qlora.block_size=48"])
  with pytest.raises(ValueError, match=r"method.qlora.block_size=48: .*"
                     r"\[64, 128\] do not split"):
    model_setup.model_config(cfg)


def test_double_quantization_of_the_scales():
  w = jax.random.normal(jax.random.key(1), (2, 256, 512)) * 0.05
  single = quant.quantize(w, "nf4", 64)
  double = quant.quantize(w, "nf4", 64, double=True)
  assert set(double) == {"codes", "scale_codes", "scale_absmax"}
  np.testing.assert_array_equal(double["codes"], single["codes"])
  assert double["scale_absmax"].shape == (2, 4, 2)
  # Each scale to within half a step of 1/255 of its block's largest.
  err = np.abs(np.asarray(quant._scale(double)) - np.asarray(single["scale"]))  # pylint: disable=protected-access
  step = np.repeat(np.asarray(double["scale_absmax"]), 256, axis=-1) / 255
  assert np.all(err <= 0.5 * step * (1 + 1e-5))
  nbytes = sum(x.nbytes for x in double.values()) / w.size
  assert nbytes == 0.5 + 1 / 64 + 4 / (64 * 256)  # 0.258x bf16
  d = np.asarray(quant.dequantize(double))
  assert np.sqrt(np.mean((d - np.asarray(w)) ** 2)) < 0.1 * 0.05


def test_double_quantized_base_initialises_into_shards():
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py:method=qlora", [
      "--config.method.qlora.double_quant=true"])
  mesh = sharding.make_mesh(cfg.mesh)  # 8 devices
  _, variables = model_setup.load_or_init_model(cfg, mesh)
  q = variables["params"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert set(q) == {"codes", "scale_codes", "scale_absmax"}
  assert q["codes"].shape == (2, 64, 64) and "fsdp" in str(
      q["codes"].sharding.spec)
  # The random init N(0, 0.02), through both levels of quantization.
  w = np.asarray(quant.dequantize(q))
  assert w.shape == (2, 128, 64) and abs(w.std() / 0.02 - 1) < 0.1
