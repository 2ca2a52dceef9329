"""Offline teacher: the cache stays aligned through packing, mixing and
resume, and offline and online top-k teachers train alike from a config."""

import json
import random

import jax
import numpy as np

import tiny_hf
import tiny_tok
from sft_jax import data
from sft_jax import models
from sft_jax.train import config as config_lib
from sft_jax.train import distill_cache
from sft_jax.train import loop

_WORDS = "alpha beta gamma delta red green blue one two three".split()


def _write(path, n, seed):
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(n):
      words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
      f.write(json.dumps({"messages": [
          {"role": "user", "content": "sort: " + " ".join(words)},
          {"role": "assistant", "content": " ".join(sorted(words))}]}) + "\n")


def _cfg(tmp, *overrides):
  cfg = config_lib.get_config_from_file(
      f"configs/tiny.py:data={tmp / 'a.jsonl'},tokenizer={tmp / 'tok'}")
  cfg.data.sources.b = data.source_config(path=str(tmp / "b.jsonl"),
                                          weight=0.5)
  cfg.data.cache_dir = str(tmp / "data_cache")
  cfg.lock()
  for key, value in config_lib.parse_overrides([
      f"--config.distill.teacher={tmp / 'teacher'}",
      "--config.distill.teacher_dtype=float32", "--config.distill.top_k=8",
      "--config.train.seq_len=48", "--config.train.batch_size=4",
      "--config.train.ce_chunk=16", "--config.data.prefetch_batches=0",
      *overrides]):
    config_lib.set_override(cfg, key, value)
  return cfg


def test_offline_cache_aligned_and_equal_to_online(tmp_path):
  tok = tiny_tok.make_tokenizer(tmp_path / "tok")
  _write(tmp_path / "a.jsonl", 40, 0)
  _write(tmp_path / "b.jsonl", 30, 1)
  tiny_hf.make_tiny_hf("llama", tmp_path / "teacher", vocab_size=320)
  cfg = _cfg(tmp_path)
  meta = distill_cache.build(cfg, str(tmp_path / "cache"), batch_size=8)
  assert meta["top_k"] == 8 and set(meta["sources"]) == {"train", "b"}

  pipe = data.make_train_pipeline(cfg.data, tok, seq_len=48, batch_size=4,
                                  teacher_cache=str(tmp_path / "cache"))
  it = iter(pipe)
  first = next(it)
  state = it.get_state()
  second = next(it)
  # Resume: the same batch, teacher outputs included.
  it2 = iter(pipe)
  it2.set_state(state)
  again = next(it2)
  for key in ("tokens", "teacher_ids", "teacher_logp"):
    np.testing.assert_array_equal(second[key], again[key])
  assert "teacher_index" not in second
  assert len(np.unique(first["source_id"][first["segment_ids"] > 0])) == 2

  # Alignment through packing and mixing: the teacher run on the packed rows
  # (segments kept apart) gives the cached top-k at every real position.
  teacher_cfg, params = models.load_hf(str(tmp_path / "teacher"),
                                       dtype="float32")
  for batch in (first, second):
    logits = models.Transformer(teacher_cfg).apply(
        {"params": params}, batch["tokens"], batch["positions"],
        batch["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    real = batch["segment_ids"] > 0
    top = np.argsort(-logp, -1)[..., :8]
    np.testing.assert_array_equal(batch["teacher_ids"][real], top[real])
    np.testing.assert_allclose(
        batch["teacher_logp"][real],
        np.take_along_axis(logp, batch["teacher_ids"], -1)[real],
        rtol=1e-5, atol=1e-5)

  # From a config, offline and online: the run logs distill_loss beside
  # loss and ce_loss, and the two teachers give the same first step (loss
  # and gradient norm, both from the initial weights).
  first_step = {}
  for name, extra in (("offline", (
      f"--config.distill.cache={tmp_path / 'cache'}",)), ("online", ())):
    cfg = _cfg(tmp_path, *extra, "--config.train.steps=2",
               "--config.log.every_steps=1", "--config.train.batch_size=8",
               "--config.checkpoint.async_save=False")
    result = loop.train(cfg, str(tmp_path / name), progress=False)
    assert result.exit_code == 0
    assert result.metrics["train/distill_loss"] > 0
    with open(tmp_path / name / "metrics.jsonl") as f:
      first_step[name] = [r for r in map(json.loads, f)
                          if "train/loss" in r][0]
    assert first_step[name]["step"] == 1
  for key in ("train/loss", "train/ce_loss", "train/distill_loss",
              "train/grad_norm"):
    np.testing.assert_allclose(first_step["offline"][key],
                               first_step["online"][key], rtol=1e-5)


def test_distill_cache_bad_config_exits_2(tmp_path, capsys):
  code = distill_cache.main(["--config", "configs/tiny.py", "--out",
                             str(tmp_path / "c")])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "distill.top_k must be > 0" in err[0]
