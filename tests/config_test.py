"""Config files, overrides, knobs, saving; every file in configs/ builds."""

import json
import pathlib

import jax
import pytest

from sft_jax import models
from sft_jax.train import config as config_lib
from sft_jax.train import flops
from sft_jax.train import model_setup

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_overrides_parse_by_declared_type():
  cfg = config_lib.load_config("configs/tiny.py", [
      "--config.optim.lr=1e-3", "--config.train.steps", "7",
      "--config.model.scan_layers=false", "--config.method.name=lora",
      "--config.data.sources.chat.weight=0.5", "--config.optim.b1=1"])
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.model.scan_layers is False
  assert cfg.method.name == "lora"
  assert cfg.data.sources.chat.weight == 0.5
  assert cfg.optim.b1 == 1.0 and isinstance(cfg.optim.b1, float)


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrr=1", r"unknown config key 'optim.lrr'; did you mean "
                             r"optim.lr"),
    ("--config.nope.x=1", r"unknown config key 'nope.x'"),
    ("--config.train.steps=ten", r"config key 'train.steps': cannot parse "
                                 r"'ten' as int"),
    ("--config.model.scan_layers=maybe", r"'model.scan_layers'.*bool"),
    ("--config.optim=1", r"'optim' is a section"),
    ("--config.train.steps", r"'train.steps': missing value"),
    ("optim.lr=1", r"expected --config.KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config("configs/tiny.py", [override])


def test_config_is_locked():
  cfg = config_lib.load_config("configs/tiny.py")
  with pytest.raises(AttributeError):
    cfg.optim.new_key = 1


def test_arg_knobs_fan_out_to_several_keys():
  cfg = config_lib.load_config("configs/tiny.py:method=freeze,steps=3")
  assert cfg.method.name == "freeze" and cfg.train.steps == 3
  assert cfg.method.trainable == "^layers/" and cfg.method.train_top_layers == 1
  lora = config_lib.load_config("configs/tiny.py:method=lora")
  assert lora.optim.lr == 3e-3 and lora.method.lora.rank == 4
  preset = config_lib.load_config("configs/presets/llama3_8b.py:method=lora")
  assert preset.model.param_dtype == "bfloat16" and preset.optim.lr == 2e-4
  with pytest.raises(config_lib.ConfigError, match="unknown config arg 'mthod'"):
    config_lib.load_config("configs/tiny.py:mthod=lora")
  with pytest.raises(config_lib.ConfigError, match="arg steps"):
    config_lib.load_config("configs/tiny.py:steps=many")
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config("configs/missing.py")


def test_save_and_reload_round_trip(tmp_path):
  cfg = config_lib.load_config("configs/tiny.py:method=lora",
                               ["--config.optim.lr=0.25"])
  config_lib.save_config(cfg, tmp_path / "config.json")
  again = config_lib.config_from_json(tmp_path / "config.json")
  assert config_lib.config_to_dict(again) == config_lib.config_to_dict(cfg)
  assert again.method.lora.targets == cfg.method.lora.targets
  flat = config_lib.flatten_config(cfg)
  assert flat["optim.lr"] == 0.25 and flat["method.name"] == "lora"
  assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def _config_files():
  return sorted(p for p in _CONFIGS.rglob("*.py")
                if not p.name.startswith("_"))


# Parameter counts of the real checkpoints, from their model cards / safetensors
# indices: the presets' architectures must match them exactly.
_PRESET_PARAMS = {
    "llama3_1b.py": 1_235_814_400,
    "llama3_8b.py": 8_030_261_248,
    "qwen25_7b.py": 7_615_616_512,
    "mistral_7b.py": 7_248_023_552,
    "gemma3_1b.py": 999_885_952,
}


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_config_file_builds(path, method):
  spec = f"{path}:method={method}"
  cfg = config_lib.load_config(spec)
  # Every key of the base config is present (forks only change values).
  base = config_lib.flatten_config(config_lib.load_config(
      str(_CONFIGS / "base.py")))
  flat = config_lib.flatten_config(cfg) if path.name != "base.py" else base
  assert set(base) - {k for k in base if k.startswith("data.sources.")} <= (
      set(flat))
  if path.name == "base.py":
    return
  hf = json.loads(cfg.model.hf_config)
  model_cfg = model_setup.model_config(
      config_lib.load_config(spec, ["--config.model.path="]))
  assert model_cfg.dtype == cfg.model.dtype
  assert (model_cfg.lora is not None) == (method == "lora")
  shapes = jax.eval_shape(lambda r: models.init(model_cfg, r),
                          jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  if path.name in _PRESET_PARAMS:
    assert n == _PRESET_PARAMS[path.name], (path.name, n)
    assert cfg.model.path and hf["model_type"] == model_cfg.model_type
  # The forward traces with the config's runtime options (remat policy,
  # dtypes, LoRA targets), abstractly: no memory is allocated.
  tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
  hidden = jax.eval_shape(
      lambda v, t: models.Transformer(model_cfg).apply(
          v, t, t, t, return_hidden=True), shapes, tokens)
  assert hidden.shape == (1, 8, model_cfg.hidden_size)
  assert hidden.dtype == jax.numpy.dtype(cfg.model.dtype)
  per_token = flops.flops_per_token(model_cfg, cfg.train.seq_len, method)
  assert per_token > (4 if method == "lora" else 6) * (
      n - model_cfg.vocab_size * model_cfg.hidden_size)


def test_llama_1b_flops_per_token_matches_hand_count():
  cfg = config_lib.load_config("configs/presets/llama3_1b.py",
                               ["--config.model.path="])
  model_cfg = model_setup.model_config(cfg)
  # 16 layers x (q,o: 2048*2048*2 + k,v: 2048*512*2 + mlp: 3*2048*8192)
  # + unembedding 2048*128256 = 1,235,746,816 matmul weights (tied; the
  # 67,584 norm weights are not matmuls).
  n = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + (
      2048 * 128256)
  attention = 6 * 16 * 4096 * 32 * 64
  assert flops.flops_per_token(model_cfg, 4096) == 6 * n + attention
  assert 6 * n + attention == pytest.approx(8.22e9, rel=1e-3)  # the anchor
  lora_cfg = model_setup.model_config(config_lib.load_config(
      "configs/presets/llama3_1b.py:method=lora", ["--config.model.path="]))
  lora_n = 16 * 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 +
                      (2048 + 8192) * 3)
  assert flops.lora_params(lora_cfg) == lora_n
  assert flops.flops_per_token(lora_cfg, 4096, "lora") == (
      4 * n + attention + 6 * lora_n)
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("cpu") is None


def test_tiny_config_runs_as_shipped_on_its_sample_data():
  """configs/tiny.py needs nothing but the repository: data and tokenizer."""
  from sft_jax import data  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/tiny.py")
  assert not cfg.model.path and cfg.model.init == "random"
  tok = data.load_tokenizer(cfg.data.tokenizer)
  assert len(tok) <= json.loads(cfg.model.hf_config)["vocab_size"]
  formats = {}
  for group in (cfg.data.sources, cfg.data.eval_sources):
    for name, src in group.items():
      lines = pathlib.Path(src.path).read_text().splitlines()
      assert len(lines) >= 16, name
      formats[name] = sorted(json.loads(lines[0]))
  assert formats["chat"] == ["messages"]
  assert formats["alpaca"] == ["input", "instruction", "output"]
  assert formats["prompt_completion"] == ["completion", "prompt"]
