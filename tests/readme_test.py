"""The README's two commands are what the project actually runs."""

import os
import pathlib
import re

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _code_blocks():
  text = (_ROOT / "README.md").read_text()
  return [b.strip() for b in re.findall(r"^```[a-z]*\n(.*?)^```", text,
                                        flags=re.M | re.S)]


def test_ci_runs_the_readme_test_command():
  test_command = _code_blocks()[1]
  ci_lines = (_ROOT / ".ci" / "run").read_text().splitlines()
  assert test_command in ci_lines


def test_first_command_runs_the_demo_and_second_the_tests():
  first, second = _code_blocks()[:2]
  assert "sft-jax demo" in first and "pytest" not in first
  assert "pytest" in second and "torch==2.13.0" in second


# --- every documented `sft-jax` command line, executed offline -------------
#
# In a scratch directory holding what the README's commands assume (a LoRA
# run at runs/my_run, heldout.jsonl, pairs.jsonl, configs/my_run.py from the
# README's own block), each documented command line runs through the
# dispatcher (`sft_jax.cli.main`, what the console script calls). The
# inference commands must succeed; a command that needs the network or the
# README's own data must fail the documented way: exit 2 and one line, never
# an argparse usage error or a traceback. Sweep lines run on a tiny experiment
# with --dry-run added where they would train; `bench` and `demo` lines
# (minutes of compute) are left to their own tests.

import io  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_SUCCEED = ("eval", "generate", "chat", "export", "score")
_SKIP = ("bench", "demo")


def _documented_commands():
  """`sft-jax ...` lines of the README's bash blocks, continuations joined.

  The first-hour block is left to tests/first_hour_test.py, which runs it as
  written from a directory holding configs/.
  """
  text = (_ROOT / "README.md").read_text()
  head, rest = text.split("## The first hour", 1)
  text = head + "\n## " + rest.split("\n## ", 1)[1]
  lines = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
    for line in block.replace("\\\n", " ").splitlines():
      m = re.search(r"(?:^|\$\(|\s)(?:\.venv/bin/)?sft-jax (.*?)(?:\||\)|$)",
                    line)
      if m and not line.lstrip().startswith(("python3", "sbatch")):
        argv = shlex.split(m.group(1), comments=True)
        if argv and argv[0] not in _SKIP:
          lines.append(argv)
  return lines


_EXPERIMENT = """
from sft_jax.train import config as config_lib

def get_config(arg=None):
  return config_lib.get_config_from_file({tiny!r})

def get_sweep(arg=None):
  return [{{"optim.lr": lr}} for lr in (1e-3, 2e-3, 3e-3, 4e-3)]
"""


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  import tiny_hf  # pylint: disable=g-import-not-at-top
  import tiny_tok  # pylint: disable=g-import-not-at-top
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("readme")
  tok = tiny_tok.make_tokenizer(d / "base")
  tiny_hf.make_tiny_hf("qwen2", d / "base", vocab_size=len(tok))
  record = {"messages": [{"role": "user", "content": "Summarise: a b c"},
                         {"role": "assistant", "content": "a b c"}]}
  (d / "train.jsonl").write_text((json.dumps(record) + "\n") * 8)
  (d / "heldout.jsonl").write_text(json.dumps(record) + "\n")
  (d / "pairs.jsonl").write_text(json.dumps(
      {"prompt": "Summarise: a b", "completion": " a b"}) + "\n")
  readme = (_ROOT / "README.md").read_text()
  my_run = re.search(r"^```python\n# configs/my_run.py\n(.*?)^```", readme,
                     flags=re.M | re.S).group(1)
  (d / "configs").mkdir()
  (d / "configs" / "my_run.py").write_text(my_run)
  tiny = (f"{_ROOT}/configs/tiny.py:model={d / 'base'},"
          f"data={d / 'train.jsonl'},method=lora,steps=2")
  (d / "exp.py").write_text(_EXPERIMENT.format(tiny=tiny))
  cwd = os.getcwd()
  os.chdir(d)
  try:
    # The shipped sample data, so the run has eval sources, as the README's
    # my_run does.
    assert cli.main(["train", "--config",
                     f"{_ROOT}/configs/tiny.py:model={d / 'base'},"
                     "method=lora,steps=2", "--workdir", "runs/my_run",
                     "--no-progress"]) == 0
  finally:
    os.chdir(cwd)
  return d


def _sweep_argv(argv, d):
  argv = [str(d / "exp.py") if a == "EXP.py" else str(d / "W") if a == "W"
          else str(_ROOT / a) if a.startswith("experiments/") else a
          for a in argv]
  argv = [str(d / a) if a.startswith("runs/") else a for a in argv]
  if not {"--dry-run", "--list", "--summary-only"} & set(argv):
    end = argv.index("--") if "--" in argv else len(argv)
    argv.insert(end, "--dry-run")
  return argv


def test_every_documented_command_runs_or_fails_in_one_line(
    scratch, capsys, monkeypatch):
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(scratch)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(sys, "stdin", io.StringIO("Summarise: a\n/exit\n"))
  commands = _documented_commands()
  seen = {argv[0] for argv in commands}
  assert {"train", "eval", "generate", "chat", "export", "score", "sweep",
          "data"} <= seen, seen
  for argv in commands:
    if argv[0] == "sweep":
      argv = _sweep_argv(argv, scratch)
    try:
      rc = cli.main(argv)
    except SystemExit as e:  # argparse: the documented syntax is wrong
      rc = f"usage error {e.code}"
    out, err = capsys.readouterr()
    where = f"{shlex.join(argv)}\n{out[-1500:]}\n{err[-1500:]}"
    assert "Traceback" not in err, where
    # A hub id (owner/name that is no local path) cannot load offline.
    needs_hub = any(re.fullmatch(r"[\w.-]+/[\w.-]+", a)
                    and not os.path.exists(a) for a in argv)
    if (argv[0] in _SUCCEED or argv[0] == "sweep") and not needs_hub:
      assert rc == 0, where
    else:
      assert rc in (0, 2), where
      if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"sft-jax {argv[0]}: "), where
  assert (scratch / "exports" / "my_run" / "config.json").exists()
  assert (scratch / "exports" / "my_run-lora" / "adapter_config.json").exists()
  scores = [json.loads(l) for l in open(scratch / "scores.jsonl")]
  assert len(scores) == 1 and scores[0]["logprob"] < 0
  evals = list((scratch / "runs" / "my_run" / "eval").glob("gen_heldout_*"))
  assert len(evals) == 1


def test_eval_out_moves_every_output(scratch, capsys, monkeypatch):
  from sft_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(scratch)
  run_tb = sorted(p.name for p in (scratch / "runs" / "my_run" / "tb").iterdir())
  assert cli.main(["eval", "--run", "runs/my_run", "--data", "heldout.jsonl",
                   "--out", "elsewhere", "--max-new-tokens", "4",
                   "--name", "moved"]) == 0
  capsys.readouterr()
  result = json.loads((scratch / "elsewhere" / "gen_moved_step_2.json")
                      .read_text())
  assert len(result["samples"]) == 1
  assert any((scratch / "elsewhere" / "tb").iterdir())
  # Nothing of this evaluation went into the run directory.
  assert sorted(p.name for p in (scratch / "runs" / "my_run" / "tb")
                .iterdir()) == run_tb
  assert not list((scratch / "runs" / "my_run").glob("eval/gen_moved*"))
