"""scripts/benchmark_table.py: rows, failures and the markdown table."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).parents[1] / "scripts" / "benchmark_table.py"
_spec = importlib.util.spec_from_file_location("benchmark_table", _PATH)
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_markdown_shows_mfu_memory_and_backends():
  rows = [dict(row="a", status="ok", remat="full", tokens_per_s=1234.5,
               mfu=0.4567, peak_memory_bytes=3 * 2**30, compile_s=12.5,
               step_s=0.25, attention="attention auto on gpu -> full: "
               "tokamax, window 512: tokamax; remat full"),
          dict(row="b", status="skipped: budget spent", remat="none")]
  text = table.markdown(rows, "NVIDIA_H200", "2026-12-02").splitlines()
  assert text[4] == ("| a | ok | full: tokamax, window 512: tokamax | full | "
                     "1234.5 | 45.7% | 3.0 | 12.5 | 0.25 |")
  assert text[5] == "| b | skipped: budget spent | - | none | - | - | - | - | - |"


def test_a_failing_row_is_reported_not_raised():
  row = table.run_row("bad", "configs/no_such_preset.py",
                      dict(seq_len=8, batch_size=1, remat="none"), steps=1,
                      timeout_s=120, isolate=True)
  assert row["row"] == "bad" and row["status"].startswith("failed (exit 2)")


def test_rows_cover_the_issue_table():
  names = [r[0] for r in table.ACCELERATOR_ROWS]
  for want in ("llama3.2-1b full 4096", "llama3.2-1b lora 4096",
               "llama3.1-8b lora 4096", "llama3.1-8b full 4096",
               "qwen2.5-7b lora 4096", "gemma3-1b full 4096",
               "llama3.2-1b full 2048", "llama3.2-1b full 8192"):
    assert want in names
