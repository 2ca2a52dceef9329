"""Progress you can see: a bar on a terminal, plain timed lines elsewhere.

On a terminal a tqdm bar (count, rate, ETA); when output goes to a file or a
pipe, one plain line every `interval` seconds with elapsed time, rate and,
when the total is known, the ETA, so logs hold no carriage-return clutter.
"""

import sys
import time


def is_terminal(stream=None) -> bool:
  stream = sys.stderr if stream is None else stream
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def duration(seconds: float) -> str:
  """12s, 3m05s, 1h02m."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(done: float, total: float, elapsed: float) -> str:
  """Time left at the mean rate so far ("?" before any progress)."""
  if done <= 0 or elapsed <= 0:
    return "?"
  return duration((total - done) * elapsed / done)


class Meter:
  """Counts work items: `update(n)` as they are done, `close()` at the end."""

  def __init__(self, desc: str, unit: str, *, total: int | None = None,
               enabled: bool = True, bar: bool | None = None,
               interval: float = 10.0, stream=None):
    self.desc, self.unit, self.total = desc, unit, total
    self.n, self._enabled = 0, enabled
    self._stream = sys.stderr if stream is None else stream
    self._interval = interval
    self._start = self._last_line = time.perf_counter()
    self._bar = None
    if enabled and (is_terminal(self._stream) if bar is None else bar):
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit,
                            unit_scale=True, file=self._stream,
                            mininterval=0.5, leave=False)

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._start

  def line(self) -> str:
    rate = self.n / self.elapsed if self.elapsed > 0 else 0.0
    done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
    text = (f"{self.desc}: {done} {self.unit}  {rate:,.0f} {self.unit}/s  "
            f"elapsed {duration(self.elapsed)}")
    if self.total:
      text += f"  ETA {eta(self.n, self.total, self.elapsed)}"
    return text

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
    elif time.perf_counter() - self._last_line >= self._interval:
      self._last_line = time.perf_counter()
      print(self.line(), file=self._stream, flush=True)

  def close(self, summary: str | None = None) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if summary is not None:
      print(summary, file=self._stream, flush=True)


class TrainProgress:
  """On process 0: a tqdm bar (ETA, loss) on a terminal, else plain lines
  with elapsed time and ETA every log step."""

  def __init__(self, total: int, start: int, enabled: bool, bar: bool,
               log_every: int):
    self._bar = None
    self._enabled, self._log_every = enabled, max(1, log_every)
    self._total, self._t0 = total, time.perf_counter()
    self._first = None  # (time, step) of the first step after compilation
    if enabled and bar and is_terminal():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step",
                            dynamic_ncols=True, mininterval=0.5)

  def update(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                            lr=f"{scalars['train/lr']:.2e}", refresh=False)
    else:
      now = time.perf_counter()
      if self._first is None:
        self._first = (now, step)
      if step % self._log_every:
        return
      t1, s1 = self._first
      epoch = (f"  epoch {scalars['train/epoch']:.2f}"
               if "train/epoch" in scalars else "")
      print(f"step {step}/{self._total}: loss {scalars['train/loss']:.4f}  "
            f"lr {scalars['train/lr']:.3e}  "
            f"grad_norm {scalars['train/grad_norm']:.3f}{epoch}  "
            f"elapsed {duration(now - self._t0)}  ETA "
            f"{eta(step - s1, self._total - s1, now - t1)}",
            flush=True)

  def write(self, text: str) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
