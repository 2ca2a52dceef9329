"""The README's two commands are what the project actually runs."""

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
