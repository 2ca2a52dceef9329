"""The error contract, case by case: every bad input is one line on stderr
`sft-jax COMMAND: <what>: <file/line/key>: <reason>`, exit code 2, no
traceback, and (for train) no half-made run directory.

Each case runs the real dispatcher in process (`sft_jax.cli.main`, what the
`sft-jax` console script calls); all fail before any weights are loaded, so
the whole file takes a few seconds.
"""

import json
import os
import re
import shutil
import signal

import pytest

import tiny_hf
import tiny_tok
from sft_jax import cli
from sft_jax import errors

_GOOD = {"messages": [{"role": "user", "content": "reverse: a b"},
                      {"role": "assistant", "content": "b a"}]}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
  d = tmp_path_factory.mktemp("errors")
  tiny_tok.make_tokenizer(d / "tok")
  (d / "train.jsonl").write_text(json.dumps(_GOOD) + "\n")
  (d / "empty.jsonl").write_text("")
  (d / "unknown_format.jsonl").write_text('{"foo": 1}\n{"foo": 2}\n')
  (d / "no_reply.jsonl").write_text(json.dumps(
      {"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  (d / "a_file").write_text("x")
  (d / "syntax.py").write_text("def get_config(arg=None)\n  return 1\n")
  (d / "raises.py").write_text(
      "def get_config(arg=None):\n  x = {}\n  return x['missing']\n")
  tiny_hf.make_tiny_hf("llama", d / "hf")
  shutil.copytree(d / "hf", d / "truncated")
  weights = (d / "hf" / "model.safetensors").read_bytes()
  (d / "truncated" / "model.safetensors").write_bytes(
      weights[:len(weights) // 2])
  shutil.copytree(d / "hf", d / "bad_config")
  (d / "bad_config" / "config.json").write_text(
      '{"model_type": "llama",\n "hidden_size": 3')
  os.makedirs(d / "run_without_checkpoint" / "checkpoints")
  return d


def _one_line(capsys, argv, command, *needles):
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  assert rc == errors.EXIT_USAGE, (rc, out[-2000:], err[-2000:])
  assert "Traceback" not in out + err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"sft-jax {command}: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def _train(d, knobs, *extra, workdir=None):
  workdir = workdir or str(d / "runs" / "w")
  return ["train", "--config", f"configs/tiny.py:{knobs}", "--workdir",
          workdir, "--no-progress", *extra]


def _knobs(d, data="train.jsonl", **more):
  knobs = dict(data=str(d / data), tokenizer=str(d / "tok"), **more)
  return ",".join(f"{k}={v}" for k, v in knobs.items())


def test_random_model_without_a_tokenizer(d, capsys):
  _one_line(capsys, _train(d, "", "--config.data.tokenizer="), "train",
            "config: data.tokenizer is empty", "tokenizer=DIR")
  assert not (d / "runs").exists()  # nothing half-made


@pytest.mark.parametrize("override,needle", [
    ("train.steps=0", "train.steps=0: must be >= 1"),
    ("train.grad_accum=3", "train.batch_size=8 is not a multiple of "
     "train.grad_accum=3"),
    ("method.name=lorax", "method.name='lorax': expected one of"),
    ("optim.name=adam", "optim.name='adam': expected one of"),
    ("optim.lr=-1", "optim.lr=-1.0: must be >= 0"),
    ("data.sources.train.path=", "data.sources.train.path is empty"),
    ("eval.generate=true", "eval.generate=True needs eval.generate_data"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean optim.lr"),
    ("train.steps=ten", "config key 'train.steps': cannot parse 'ten'"),
])
def test_bad_config_value_fails_before_loading(d, capsys, override, needle):
  workdir = str(d / "runs" / "bad_value")
  _one_line(capsys, _train(d, _knobs(d), f"--config.{override}",
                           workdir=workdir), "train", needle)
  assert not os.path.exists(workdir)


def test_config_file_with_a_syntax_error(d, capsys):
  _one_line(capsys, ["train", "--config", str(d / "syntax.py"), "--workdir",
                     str(d / "runs" / "x")], "train",
            f"config: {d / 'syntax.py'}:1: syntax error")


def test_config_file_that_raises_names_its_line(d, capsys):
  _one_line(capsys, ["train", "--config", str(d / "raises.py"), "--workdir",
                     str(d / "runs" / "x")], "train",
            f"{d / 'raises.py'}:3: get_config raised KeyError")


def test_missing_model_directory(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, model=d / "nope")), "train",
            f"model: model.path={d / 'nope'}: no such directory")


def test_truncated_safetensors(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, model=d / "truncated")), "train",
            f"model: {d / 'truncated' / 'model.safetensors'}: truncated",
            "download it again")
  # The same file read by another command: the same line.
  _one_line(capsys, ["generate", "--model", str(d / "truncated"), "--prompt",
                     "hi"], "generate", "model.safetensors: truncated")


def test_corrupt_config_json(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, model=d / "bad_config")), "train",
            f"{d / 'bad_config' / 'config.json'}:2: invalid JSON")


def test_hub_id_not_available_offline(d, capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _one_line(capsys, ["generate", "--model", "no-such-org/no-such-model",
                     "--prompt", "hi"], "generate",
            "no-such-org/no-such-model")


def test_empty_data_file(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, data="empty.jsonl")), "train",
            f"data: data.sources.train.path: {d / 'empty.jsonl'}: the file "
            "is empty")


def test_missing_data_file(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, data="nope.jsonl")), "train",
            f"{d / 'nope.jsonl'}: no such file")


def test_source_of_unknown_format_names_the_record(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, data="unknown_format.jsonl")),
            "train", f"{d / 'unknown_format.jsonl'}:1: cannot detect the "
            "format")


def test_source_whose_every_record_is_dropped(d, capsys):
  _one_line(capsys, _train(d, _knobs(d, data="no_reply.jsonl"),
                           workdir=str(d / "runs" / "dropped")), "train",
            "source 'train'", "yields 0 examples",
            f"{d / 'no_reply.jsonl'}:1")


def test_workdir_is_a_file(d, capsys):
  _one_line(capsys, _train(d, _knobs(d), workdir=str(d / "a_file")), "train",
            f"workdir: {d / 'a_file'}: is a file")


def test_workdir_not_writable(d, capsys):
  # /sys is read-only for every user, root included.
  _one_line(capsys, _train(d, _knobs(d), workdir="/sys/sft_jax_run"),
            "train", "/sys")


def test_export_without_a_checkpoint(d, capsys):
  _one_line(capsys, ["export", "--run", str(d / "run_without_checkpoint"),
                     "--out", str(d / "exported"), "--merge"], "export",
            "no complete checkpoint yet")
  _one_line(capsys, ["export", "--run", str(d / "hf"), "--out",
                     str(d / "exported"), "--merge"], "export",
            f"{d / 'hf'}: not a run directory")


def test_eval_on_records_without_references(d, capsys):
  _one_line(capsys, ["eval", "--run", str(d / "hf"), "--data",
                     str(d / "no_reply.jsonl"), "--out", str(d / "ev")],
            "eval", f"{d / 'no_reply.jsonl'}:1")


def test_eval_output_not_writable_fails_before_generating(d, capsys):
  _one_line(capsys, ["eval", "--run", str(d / "hf"), "--data",
                     str(d / "train.jsonl"), "--out", str(d / "a_file")],
            "eval", f"{d / 'a_file'}: is a file")


def test_score_with_a_missing_model(d, capsys):
  _one_line(capsys, ["score", "--model", str(d / "nope"), "--data",
                     str(d / "train.jsonl"), "--out", str(d / "s.jsonl")],
            "score", str(d / "nope"))


def test_sweep_with_a_missing_experiment(d, capsys):
  _one_line(capsys, ["sweep", str(d / "nope.py"), "--workdir",
                     str(d / "sw")], "sweep", "nope.py")


def test_debug_flag_adds_the_traceback(d, capsys):
  rc = cli.main(["--debug", *_train(d, _knobs(d), "--config.train.steps=0")])
  err = capsys.readouterr().err
  assert rc == 2 and "Traceback" in err
  assert err.strip().splitlines()[-1] == (
      "sft-jax train: config: train.steps=0: must be >= 1")


def test_a_bug_keeps_its_traceback_and_exits_1(capsys, monkeypatch):
  def broken(argv):
    del argv
    return {}["bug"]
  rc = cli.run_command("train", broken, [], debug=False)
  err = capsys.readouterr().err
  assert rc == errors.EXIT_BUG
  assert "Traceback" in err and "KeyError: 'bug'" in err
  assert "internal error (KeyError); this is a bug" in err


def test_bad_utf8_byte_costs_one_record(d, capsys):
  bad = d / "bad_byte.jsonl"
  with open(bad, "wb") as f:
    for i in range(3):
      line = json.dumps(_GOOD).encode()
      if i == 1:
        line = line.replace(b"reverse", b"rev\xffrse")
      f.write(line + b"\n")
  rc = cli.main(["data", "inspect", "--tokenizer", str(d / "tok"), "--data",
                 str(bad), "--examples", "0", "--color", "never"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "records: 2 kept, 1 dropped; examples: 2 kept" in out
  assert re.search(rf"{re.escape(str(bad))}:2: byte 0xff at column \d+ is "
                   "not UTF-8", out), out


def test_second_ctrl_c_exits_at_once():
  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  preemption = loop._Preemption()  # pylint: disable=protected-access
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.reached(1)  # the first: save at the step's end
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))  # pylint: disable=protected-access
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  assert f"usage: sft-jax {command}" in capsys.readouterr().out


def test_console_entry_point_in_a_real_process(d):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts == {"sft-jax": "sft_jax.cli:main"}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-m", "sft_jax", "train", "--config",
       "configs/tiny.py", "--workdir", str(d / "runs" / "entry"),
       "--config.data.tokenizer="],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "sft-jax train: config: data.tokenizer is empty (and model.path too, "
      "whose tokenizer is the default): set data.tokenizer (e.g. "
      "FILE.py:tokenizer=DIR for a config with that knob, or "
      "--config.data.tokenizer=DIR)"]


def test_one_logger_named_after_the_command_and_quiet_libraries(capsys):
  import logging  # pylint: disable=g-import-not-at-top
  cli._setup_logging("eval", verbose=False)  # pylint: disable=protected-access
  logging.getLogger("sft_jax").warning("3 records dropped")
  logging.getLogger("sft_jax").info("not shown")
  logging.getLogger("absl").warning("orbax bookkeeping")
  assert capsys.readouterr().err == "sft-jax eval: warning: 3 records dropped\n"
  assert logging.getLogger("absl").getEffectiveLevel() == logging.ERROR
  cli._setup_logging("eval", verbose=True)  # pylint: disable=protected-access
  assert logging.getLogger("absl").getEffectiveLevel() == logging.INFO
  assert logging.getLogger("sft_jax").getEffectiveLevel() == logging.INFO
  cli._setup_logging("eval", verbose=False)  # pylint: disable=protected-access
