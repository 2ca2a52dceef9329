"""Runs sweep points as child processes, a few at a time, with their logs.

Each point's process writes into `<run dir>/sweep.log` (and to the console
when one runs at a time). A clean exit leaves `<run dir>/sweep_done.json`, so
a rerun skips that point; a preempted or failed one is launched again and
resumes from its own checkpoints. See sft_jax/sweep.py for the command.
"""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Sequence

from sft_jax import errors
from sft_jax.sweep_summary import SweepError

DONE_MARKER = "sweep_done.json"
LOG_NAME = "sweep.log"
TRAIN_COMMAND = (sys.executable, "-m", "sft_jax", "train")


def _pump(stream, log, echo: bool):
  """Copies a child's output to its log file (and the console) as it comes."""
  fd = stream.fileno()
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    log.write(chunk)
    log.flush()
    if echo:
      sys.stdout.buffer.write(chunk)
      sys.stdout.flush()


@dataclasses.dataclass
class _Running:
  point: Any  # sft_jax.sweep.Point
  proc: subprocess.Popen
  pump: threading.Thread
  log: Any
  start: float


def _launch(point: Any, cmd: list[str], echo: bool,
            env: Mapping[str, str] | None) -> _Running:
  os.makedirs(point.workdir, exist_ok=True)
  log = open(os.path.join(point.workdir, LOG_NAME), "ab")
  log.write(f"\n$ {shlex.join(cmd)}\n".encode())
  log.flush()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL,
                          env=None if env is None else dict(env))
  pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo),
                          daemon=True)
  pump.start()
  return _Running(point, proc, pump, log, time.time())


def _finish(run: _Running, config_spec: str, cmd: list[str]) -> int:
  rc = run.proc.wait()
  run.pump.join()
  run.log.close()
  seconds = time.time() - run.start
  if rc == 0:
    marker = {"name": run.point.name, "overrides": run.point.overrides,
              "config": config_spec, "command": cmd,
              "seconds": round(seconds, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # Unique per writer: on a pod every host's runner writes the same marker
    # into the shared run directory.
    tmp = os.path.join(run.point.workdir,
                       f"{DONE_MARKER}.{os.uname().nodename}.{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump(marker, f, indent=1)
    os.replace(tmp, os.path.join(run.point.workdir, DONE_MARKER))
    print(f"[sweep] {run.point.name}: done in {seconds:.0f}s", flush=True)
  elif rc == errors.EXIT_PREEMPTED:
    print(f"[sweep] {run.point.name}: preempted after {seconds:.0f}s (saved); "
          "rerun the sweep to resume it", flush=True)
  else:
    print(f"[sweep] {run.point.name}: FAILED (exit code {rc}) after "
          f"{seconds:.0f}s; see {os.path.join(run.point.workdir, LOG_NAME)}",
          flush=True)
  return rc


def run_points(points: Sequence[Any], config_spec: str, *,
               parallel: int = 1,
               train_command: Sequence[str] = TRAIN_COMMAND,
               extra_args: Sequence[str] = (),
               env: Mapping[str, str] | None = None) -> dict[str, int]:
  """Runs the unfinished `points`, `parallel` at a time.

  Returns run name -> exit code for the points launched (finished points are
  skipped and absent). A failed point does not stop the others.
  """
  if parallel < 1:
    raise SweepError(f"--parallel must be >= 1, got {parallel}")
  todo = []
  for p in points:
    if p.done:
      print(f"[sweep] {p.name}: already finished, skipping", flush=True)
    else:
      todo.append(p)
  results, running = {}, []
  echo = parallel == 1
  try:
    while todo or running:
      while todo and len(running) < parallel:
        point = todo.pop(0)
        cmd = point.command(config_spec, train_command, extra_args)
        state = "resuming" if os.path.isdir(point.workdir) else "starting"
        print(f"[sweep] {point.name}: {state} -> {point.workdir}", flush=True)
        running.append(_launch(point, cmd, echo, env))
      time.sleep(0.05)
      for run in [r for r in running if r.proc.poll() is not None]:
        running.remove(run)
        cmd = run.point.command(config_spec, train_command, extra_args)
        results[run.point.name] = _finish(run, config_spec, cmd)
  except KeyboardInterrupt:
    # SIGTERM lets train save a checkpoint, so the next run resumes.
    for run in running:
      run.proc.terminate()
    for run in running:
      run.proc.wait()
      run.pump.join()
      run.log.close()
    raise
  return results
