"""Progress output: durations, ETA, and plain lines off a terminal."""

import io

from sft_jax import progress


def test_duration_and_eta():
  assert progress.duration(7.4) == "7s"
  assert progress.duration(185) == "3m05s"
  assert progress.duration(3725) == "1h02m"
  # 10 of 40 done in 20 s: 30 left at 2 s each.
  assert progress.eta(10, 40, 20.0) == "1m00s"
  assert progress.eta(0, 40, 5.0) == "?"


def test_meter_writes_plain_timed_lines_when_not_a_terminal():
  out = io.StringIO()
  meter = progress.Meter("tokenizing source 'chat'", "examples", total=4,
                         interval=0.0, stream=out)
  for _ in range(4):
    meter.update()
  meter.close("done")
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert len(lines) == 5 and lines[-1] == "done"
  assert lines[1].startswith("tokenizing source 'chat': 2/4 examples  ")
  assert "examples/s  elapsed 0s  ETA 0s" in lines[1]
