"""The training loop end to end, through the `sft-jax train` CLI.

Each run is a real child process (2 simulated CPU devices), sharing one
persistent compilation cache so only the first run pays for compiling.

  * the tiny config trains, the loss goes down, the run directory is complete
    and TensorBoard's own reader gives back the logged curves and HParams;
  * SIGTERM and SIGINT (Ctrl-C) save and exit with code 75; SIGKILL loses
    nothing committed; a run stopped all three ways and resumed equals the
    uninterrupted run exactly (every per-step loss and every final parameter);
  * a non-finite loss stops the run naming the step, with no checkpoint of it;
  * unit checks of checkpoint retention, JSONL truncation, early stopping.
"""

import json
import os
import pathlib
import random
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_tok

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12

# An experiment forking the tiny config, as a user would write one.
_EXPERIMENT = '''
from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.get_config_from_file("configs/tiny.py:" + (arg or ""))
  c.data.eval_sources.heldout = data_config.source_config(path={eval!r})
  c.data.cache_dir = {cache!r}
  c.checkpoint.every_steps = 4
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "eval/heldout/loss"
  c.log.every_steps = 1
  c.eval.every_steps = 6
  # Eval loss only falls here, so with mode "max" nothing after the first
  # eval counts as an improvement: the run must stop at its second eval
  # (step 12, also the last) -- after a resume too, which needs the stopping
  # state from the checkpoint.
  c.eval.early_stop_metric = "eval/heldout/loss"
  c.eval.early_stop_mode = "max"
  c.eval.early_stop_patience = 1
  return c
'''

_WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats "
          "sleep near one red door").split()


def _records(n, seed):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 7))]
    out.append({"messages": [
        {"role": "user", "content": "reverse: " + " ".join(words)},
        {"role": "assistant", "content": " ".join(reversed(words))}]})
  return out


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train_loop")
  tiny_tok.make_tokenizer(tmp / "tok")
  _write_jsonl(tmp / "train.jsonl", _records(160, seed=0))
  _write_jsonl(tmp / "eval.jsonl", _records(24, seed=1))
  exp = tmp / "exp.py"
  exp.write_text(_EXPERIMENT.format(eval=str(tmp / "eval.jsonl"),
                                    cache=str(tmp / "data_cache")))
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
      JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
  config = (f"{exp}:data={tmp / 'train.jsonl'},tokenizer={tmp / 'tok'},"
            f"steps={STEPS}")
  return dict(tmp=tmp, env=env, config=config)


def _train(inputs, workdir, *extra, child=None):
  """Runs `sft-jax train` (through tests/train_child.py when `child`)."""
  args = ["--config", inputs["config"], "--workdir", str(workdir),
          "--no-progress", *extra]
  if child is None:
    cmd = [sys.executable, "-m", "sft_jax", "train", *args]
  else:
    cmd = [sys.executable, str(REPO / "tests" / "train_child.py"), *child,
           "--", *args]
  return subprocess.run(cmd, env=inputs["env"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _records_by_step(workdir):
  out = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      r = json.loads(line)
      out.setdefault(r["step"], {}).update(r)
  return out


def _deterministic(record):
  # Wall-clock figures differ between runs; everything else must not.
  return {k: v for k, v in record.items()
          if k != "time" and not k.startswith("perf/")}


def _final_params(workdir, step=STEPS):
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  run = run_lib.load_run(str(workdir), step=step)
  return run, jax.tree.map(np.asarray, run.params)


def test_cli_trains_logs_and_resumes_exactly(inputs):
  """One uninterrupted run, checked, then the interrupted run against it.

  A single test so that parallel test workers never train the reference
  twice.
  """
  reference = inputs["tmp"] / "reference"
  proc = _ok(_train(inputs, reference))
  assert "Early stop at step 12" in proc.stdout, proc.stdout[-2000:]
  _check_training_and_run_directory(reference)
  _check_tensorboard(reference)
  _check_sigterm_and_kill_then_resume(inputs, reference)


def _check_training_and_run_directory(workdir):
  records = _records_by_step(workdir)
  assert sorted(s for s in records if s > 0) == list(range(1, STEPS + 1))
  losses = [records[s]["train/loss"] for s in range(1, STEPS + 1)]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  assert all(np.isfinite(losses))
  # Eval at steps 6 and 12 (eval.every_steps), loss and perplexity agree.
  for s in (6, 12):
    ev = records[s]
    assert ev["eval/heldout/perplexity"] == pytest.approx(
        np.exp(ev["eval/heldout/loss"]), rel=1e-6)
    assert 0 <= ev["eval/heldout/accuracy"] <= 1
    assert ev["eval/loss"] == ev["eval/heldout/loss"]  # a single eval set
  assert records[12]["eval/heldout/loss"] < records[6]["eval/heldout/loss"]
  # Per-source train loss: one source, so it is the loss itself.
  assert records[5]["train/loss/train"] == pytest.approx(
      records[5]["train/ce_loss"], rel=1e-5)
  assert 0 < records[5]["train/packing_efficiency"] <= 1
  assert records[0]["params/trainable_params"] > 0

  # Run directory: config, tokenizer with its chat template, checkpoints.
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == STEPS
  assert config["checkpoint"]["best_metric"] == "eval/heldout/loss"
  run, _ = _final_params(workdir)
  assert run.tokenizer.chat_template == tiny_tok.CHATML
  assert run.step == STEPS and run.lora is None and run.base_model is None
  # Saved every 4 steps and at the evals (6, 12), keeping the last 2 plus
  # the best by eval loss.
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  best = min((6, 12), key=lambda s: records[s]["eval/heldout/loss"])
  assert run_lib.checkpoint_steps(str(workdir)) == sorted({8, 12, best})


def _check_tensorboard(workdir):
  from tensorboard.backend.event_processing import plugin_event_accumulator as event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir / "tb"), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  records = _records_by_step(workdir)
  tags = acc.Tags()["tensors"]
  for tag in ("train/loss", "train/lr", "train/grad_norm", "train/param_norm",
              "train/update_norm", "train/loss/train",
              "train/packing_efficiency", "perf/tokens_per_s",
              "perf/supervised_tokens_per_s", "eval/heldout/loss",
              "eval/heldout/accuracy", "eval/heldout/perplexity"):
    assert tag in tags, (tag, tags)
  events = acc.Tensors("train/loss")
  assert [e.step for e in events] == list(range(1, STEPS + 1))
  for e in events:
    value = float(tensor_util.make_ndarray(e.tensor_proto))
    assert value == np.float32(records[e.step]["train/loss"])
  ev = acc.Tensors("eval/heldout/loss")
  assert [e.step for e in ev] == [6, 12]
  # HParams: the session-start summary carries the resolved config.
  content = acc.PluginTagToContent("hparams")
  start = [plugin_data_pb2.HParamsPluginData.FromString(c)
           for c in content.values()]
  start = [d.session_start_info for d in start
           if d.HasField("session_start_info")]
  assert len(start) == 1
  assert start[0].hparams["optim.lr"].number_value == pytest.approx(1e-3)
  assert start[0].hparams["method.name"].string_value == "full"


def _check_sigterm_and_kill_then_resume(inputs, ref_dir):
  """SIGTERM, resume, SIGINT, resume, SIGKILL, resume: equal to the
  uninterrupted run."""
  workdir = inputs["tmp"] / "interrupted"
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top

  # 1. SIGTERM once step 3 is logged: the loop saves and exits with the
  #    "preempted" code, so a scheduler requeues it.
  proc = _train(inputs, workdir, child=["--signal", "TERM", "--at-step", "3"])
  assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
  stopped = re.search(r"Preempted: saved step (\d+)", proc.stderr)
  assert stopped, proc.stderr[-2000:]
  stopped = int(stopped.group(1))
  assert stopped in (3, 4)
  assert run_lib.checkpoint_steps(str(workdir))[-1] == stopped

  # 2. Resume; Ctrl-C (SIGINT) once step 5 is logged: saved like SIGTERM.
  proc = _train(inputs, workdir, child=["--signal", "INT", "--at-step", "5"])
  assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"Resuming from the checkpoint of step {stopped}" in proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  interrupted = int(re.search(r"Preempted: saved step (\d+)",
                              proc.stderr).group(1))
  assert interrupted in (5, 6)
  assert run_lib.checkpoint_steps(str(workdir))[-1] == interrupted

  # 3. Resume; SIGKILL after step 10 is logged and checkpoint 8 committed:
  #    steps 9-10 are lost with the process.
  proc = _train(inputs, workdir, child=["--signal", "KILL", "--at-step", "10",
                                        "--after-checkpoint", "8"])
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert f"Resuming from the checkpoint of step {interrupted}" in proc.stdout
  assert run_lib.checkpoint_steps(str(workdir))[-1] == 8

  # 4. Resume to the end.
  proc = _ok(_train(inputs, workdir))
  assert "Resuming from the checkpoint of step 8" in proc.stdout
  # The eval of step 6 ran before the kill; its early-stopping state came
  # back with checkpoint 8.
  assert "Early stop at step 12" in proc.stdout, proc.stdout[-2000:]

  ref, got = _records_by_step(ref_dir), _records_by_step(workdir)
  assert sorted(got) == sorted(ref)
  for step in sorted(ref):
    assert _deterministic(got[step]) == _deterministic(ref[step]), step
  _, ref_params = _final_params(ref_dir)
  _, got_params = _final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, got_params, ref_params)

  # TensorBoard drops the events the killed process wrote past step 8.
  from tensorboard.backend.event_processing import plugin_event_accumulator as event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir / "tb"), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors("train/loss")] == list(
      range(1, STEPS + 1))


def test_nonfinite_loss_stops_without_checkpointing_it(inputs):
  workdir = inputs["tmp"] / "nonfinite"
  # A huge learning rate overflows the weights within a few steps.
  proc = _train(inputs, workdir, "--config.optim.lr=1e38",
                "--config.optim.warmup_steps=0",
                "--config.checkpoint.every_steps=1")
  assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
  bad = re.search(r"step (\d+): non-finite loss", proc.stdout)
  assert bad, proc.stdout[-2000:]
  bad = int(bad.group(1))
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  steps = run_lib.checkpoint_steps(str(workdir))
  assert steps and max(steps) == bad - 1, (steps, bad)
  _, params = _final_params(workdir, step=max(steps))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  logged = _records_by_step(workdir)
  assert max(logged) == bad - 1


# --- unit checks (in process, no training) ---------------------------------

def test_checkpointer_keeps_last_k_and_best(tmp_path):
  from sft_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2,
                                 best_metric="eval/loss", best_mode="min")
  state = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
  losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: None, 10: 5.0}
  for step, loss in losses.items():
    ckpt.save(step, state, data_state={"position": step}, config={"a": 1},
              tokenizer_files={"t.json": b"{}"},
              metrics=None if loss is None else {"eval/loss": loss})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 10]
  assert ckpt.best_step() == 4
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  restored, data_state = ckpt.restore(4, abstract)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert data_state == {"position": 4}
  assert ckpt.restore_tokenizer_files(4) == {"t.json": b"{}"}
  ckpt.close()


def test_metrics_writer_drops_records_past_the_resume_step(tmp_path):
  from sft_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  w = metrics_writer.MetricsWriter(str(tmp_path))
  for step in range(1, 6):
    w.write_scalars(step, {"train/loss": 1.0 / step})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')  # A line cut short by a kill.
  w = metrics_writer.MetricsWriter(str(tmp_path), resume_step=3)
  w.write_scalars(4, {"train/loss": 0.5})
  w.close()
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]


def test_metrics_writer_after_a_start_interrupted_before_any_checkpoint(
    tmp_path):
  # The first process logged steps 0-3 and died before its first save; the
  # next one starts from 0 again and logs each step once.
  from sft_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  for _ in range(2):
    w = metrics_writer.MetricsWriter(str(tmp_path), resume_step=0)
    for step in range(0, 4):
      w.write_scalars(step, {"train/loss": 1.0 / (step + 1)})
    w.close()
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == [0, 1, 2, 3]


def test_early_stopping_counts_evaluations_without_improvement():
  from sft_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  es = evaluate.EarlyStopping("eval/loss", "min", patience=2, min_delta=0.1)
  assert not es.update({"eval/loss": 2.0})
  assert not es.update({"eval/loss": 1.95})  # < min_delta: no improvement
  assert not es.update({"eval/loss": 1.5})  # improvement resets the count
  assert not es.update({"eval/loss": 1.6})
  assert es.update({"eval/loss": 1.45})
  restored = evaluate.EarlyStopping("eval/loss", "min", patience=2)
  restored.load_state_dict(es.state_dict())
  assert restored.best == 1.5 and restored.bad_evals == 2
  with pytest.raises(KeyError, match="eval/acc"):
    evaluate.EarlyStopping("eval/acc").update({"eval/loss": 1.0})


def test_load_run_puts_saved_lora_over_the_recreated_base(tmp_path):
  """A LoRA checkpoint holds only adapters (+ optimizer state); load_run
  re-creates the frozen base (here: from the seed) and restores the rest."""
  from sft_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  from sft_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  tiny_tok.make_tokenizer(tmp_path / "tok")
  cfg = config_lib.load_config("configs/tiny.py:method=lora")
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  # As if training had moved the adapters (B starts at zero).
  state = state.replace(step=state.step + 7, trainable=jax.tree.map(
      lambda x: x + 0.25, state.trainable))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ckpt.save(7, loop.checkpointed_part(state), data_state={},
            config=config_lib.config_to_dict(cfg),
            tokenizer_files=checkpoint.read_files(str(tmp_path / "tok")))
  ckpt.close()
  # The base weights are not in the checkpoint.
  saved = os.listdir(tmp_path / "run" / "checkpoints" / "7" / "state")
  assert "_METADATA" in saved
  meta = json.loads((tmp_path / "run" / "checkpoints" / "7" / "state" /
                     "_METADATA").read_text())
  assert not any("'params'" in k or '"params"' in k
                 for k in meta["tree_metadata"]), list(meta["tree_metadata"])

  run = run_lib.load_run(str(tmp_path / "run"))
  assert run.step == 7 and run.base_model is None
  assert run.model_cfg.lora is not None and run.model_cfg.lora.rank == 4
  jax.tree.map(np.testing.assert_array_equal, run.lora,
               state.trainable["lora"])
  jax.tree.map(np.testing.assert_array_equal, run.params,
               state.frozen["params"])
  assert run.tokenizer.chat_template == tiny_tok.CHATML


def test_generation_eval_hook_scores_generated_answers(tmp_path):
  from sft_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  from sft_jax.train import model_setup  # pylint: disable=g-import-not-at-top
  from sft_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from sft_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  tok = tiny_tok.make_tokenizer(tmp_path / "tok")
  records = _records(3, seed=2)
  _write_jsonl(tmp_path / "gen.jsonl", records)
  cfg = config_lib.load_config("configs/tiny.py", [
      "--config.eval.generate=true",
      f"--config.eval.generate_data={tmp_path / 'gen.jsonl'}",
      "--config.eval.generate_max_new_tokens=3",
      "--config.eval.generate_metrics=exact_match,rouge_l"])
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, _ = step_lib.init_train_state(cfg, model_cfg, variables, mesh)
  metrics = evaluate.generation_eval(cfg, model_cfg, state, tok,
                                     out_dir=str(tmp_path / "eval"), step=7)
  assert metrics["eval/gen/num_samples"] == len(records)
  # The sample generations are saved beside the metrics.
  saved = json.loads((tmp_path / "eval" / "gen_step_7.json").read_text())
  assert saved["step"] == 7 and len(saved["samples"]) == len(records)
  assert saved["metrics"]["exact_match"] == metrics["eval/gen/exact_match"]
  # A random model does not produce the reversed words in 3 tokens.
  assert metrics["eval/gen/exact_match"] == 0.0
  assert 0.0 <= metrics["eval/gen/rouge_l"] <= 1.0
  assert 0 < metrics["eval/gen/mean_new_tokens"] <= 3
