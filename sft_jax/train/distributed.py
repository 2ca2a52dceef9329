"""Multi-host start-up: `jax.distributed` from flags or from the cluster.

Every process of a multi-host job runs the same program; `initialize` must be
called before anything touches a device. Three cases:

  * explicit flags (`--coordinator HOST:PORT --num-processes N --process-id I`),
    e.g. two processes on one machine for tests;
  * a cluster JAX recognises by itself (TPU pod slices, SLURM with more than
    one task, Open MPI), where `jax.distributed.initialize()` finds everything;
  * neither: one process, nothing to do.

On CPU, cross-process collectives need gloo, which must be chosen before the
backend starts.

A failed host: barriers wait at most `distributed.barrier_timeout_s`, and a
watchdog (`start_watchdog`) stops every other process with one line naming
the silent process after `distributed.heartbeat_timeout_s`, also when they
are blocked inside a compiled step's collectives (see PeerWatchdog).
"""

import atexit
import os
import re
import sys
import threading
import time

import jax

from sft_jax import errors


def _cluster_detected() -> bool:
  """True when the environment describes a multi-process cluster JAX knows."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # TPU pod slices: every host lists all workers.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               heartbeat_timeout_s: float = 100.0) -> tuple[int, int]:
  """Starts `jax.distributed` when the job spans several processes.

  Args:
    coordinator: "host:port" of process 0, or None to auto-detect.
    num_processes: total number of processes (with `coordinator`).
    process_id: this process's index in [0, num_processes) (with
      `coordinator`).
    heartbeat_timeout_s: distributed.heartbeat_timeout_s. JAX's own
      coordination service gets twice this: it aborts every process when a
      task misses its heartbeats, with a long log; the watchdog, started
      after this, speaks first, in one line.

  Returns:
    (process_index, process_count) after initialisation.
  """
  if not heartbeat_timeout_s > 0:
    raise errors.UserError(
        f"distributed.heartbeat_timeout_s={heartbeat_timeout_s}: must be > 0",
        what="config")
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "--coordinator, --num-processes and --process-id go together; got "
          f"coordinator={coordinator!r}, num_processes={num_processes!r}, "
          f"process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f"--process-id {process_id} is outside [0, {num_processes})")
    if num_processes > 1:
      _use_gloo_on_cpu()
      jax.distributed.initialize(
          coordinator, num_processes, process_id,
          heartbeat_timeout_seconds=_jax_heartbeat_s(heartbeat_timeout_s))
  elif _cluster_detected():
    _use_gloo_on_cpu()
    jax.distributed.initialize(
        heartbeat_timeout_seconds=_jax_heartbeat_s(heartbeat_timeout_s))
  return jax.process_index(), jax.process_count()


def _jax_heartbeat_s(timeout_s: float) -> int:
  return max(2, int(2 * timeout_s + 0.999))


def _use_gloo_on_cpu() -> None:
  # Must happen before the CPU backend exists; harmless on GPU/TPU, whose
  # collectives do not go through this setting.
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(
      jax.config.jax_platforms or "")
  if not platforms or "cpu" in platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


class BarrierTimeoutError(errors.PeerFailedError):
  """Another process did not reach a barrier in time (a failed host)."""


_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reaches barrier `name`, at most `timeout_s`.

  A host that died or hangs would otherwise leave the others waiting
  forever; instead they raise BarrierTimeoutError naming the barrier and the
  config key. One process: returns at once.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  # Barrier ids must be unique per use; every process counts alike.
  n = _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
  try:
    jax_distributed.global_state.client.wait_at_barrier(
        f"sft_jax/{name}/{n}", int(timeout_s * 1000))
  except Exception as e:  # the runtime raises a generic error on timeout
    raise BarrierTimeoutError(
        f"process {jax.process_index()} of {jax.process_count()}: the other "
        f"processes did not reach {name!r} within {timeout_s:g} s "
        "(distributed.barrier_timeout_s); a host has failed or is stuck. "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    ) from e


class MainProcessFailedError(errors.PeerFailedError):
  """Process 0 failed at work the others were waiting for."""


def main_process_first(fn, name: str, timeout_s: float):
  """fn() on process 0, then, after a barrier, on the others.

  For work whose result lands on storage every host sees (the tokenized
  data cache in data.cache_dir, a hub download in HF_HOME): process 0 does
  it once, the others find it done. Without shared storage the others
  simply redo it, so the result is correct either way. If fn fails on
  process 0 (bad data, say), it still reaches the barrier and the others
  raise MainProcessFailedError with its error instead of waiting.
  """
  if jax.process_count() == 1:
    return fn()
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  key = f"sft_jax/{name}/{_barrier_counts.get(name, 0) + 1}/error"
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:
      client.key_value_set(key, f"{type(e).__name__}: {e}"[:2000])
      barrier(name, timeout_s)
      raise
    client.key_value_set(key, "")
    barrier(name, timeout_s)
    return out
  barrier(name, timeout_s)
  error = client.blocking_key_value_get(key, int(timeout_s * 1000))
  if error:
    raise MainProcessFailedError(
        f"process {jax.process_index()}: process 0 failed at {name!r}, "
        f"so this process stops too: {error}")
  return fn()


class PeerWatchdog:
  """Stops this process when another one falls silent.

  A host that dies inside a compiled step leaves the others blocked in a
  collective (NCCL and TPU collectives wait forever) or failing with a
  transport error (gloo on CPU). Each process runs this thread: it bumps a
  counter under `sft_jax/alive/<process>` in the coordination service's
  key-value store every `timeout_s / 5` seconds and reads everyone's. When a
  peer's counter has not moved for `timeout_s` (or the coordinator, process
  0, cannot be reached for that long) it prints one line naming the process
  and exits with EXIT_PEER_FAILED, without the JAX client's shutdown (that
  would wait for the dead peer, then abort). A process that ends normally
  writes "done" first, so the others never mistake it for a failure.
  """

  _PREFIX = "sft_jax/alive/"

  def __init__(self, timeout_s: float, command: str):
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    self.timeout_s = float(timeout_s)
    self.command = command
    self._client = jax_distributed.global_state.client
    self._me, self._n = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="sft_jax-peer-watchdog")

  def start(self) -> "PeerWatchdog":
    self._thread.start()
    atexit.register(self.stop)  # runs before the client's shutdown
    return self

  def stop(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self._client.key_value_set(f"{self._PREFIX}{self._me}", "done",
                                 allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the coordinator is gone: nobody is left to tell

  def _run(self) -> None:
    now = time.monotonic()
    last = {p: None for p in range(self._n) if p != self._me}
    moved = dict.fromkeys(last, now)
    contact, beat = now, 0
    while not self._stop.wait(max(0.2, self.timeout_s / 5)):
      now = time.monotonic()
      try:
        beat += 1
        self._client.key_value_set(f"{self._PREFIX}{self._me}", str(beat),
                                   allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(self._PREFIX))
        contact = now
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        if now - contact > self.timeout_s:
          self._fail(f"process 0 (the coordinator) has not answered for "
                     f"{self.timeout_s:g} s (distributed.heartbeat_timeout_s)"
                     f": it has failed or is unreachable ({_first_line(e)})")
        continue
      for p in last:
        value = values.get(f"{self._PREFIX}{p}")
        if value == "done":
          moved[p] = now
        elif value != last[p]:
          last[p], moved[p] = value, now
        elif now - moved[p] > self.timeout_s:
          self._fail(f"process {p} sent no heartbeat for {self.timeout_s:g} s"
                     " (distributed.heartbeat_timeout_s): it has failed or "
                     "hangs")

  def _fail(self, what: str) -> None:
    if self._stop.is_set():
      return
    print(f"sft-jax {self.command}: distributed: process {self._me} of "
          f"{self._n}: {what}; this process stops too (exit code "
          f"{errors.EXIT_PEER_FAILED}); rerun resumes from the last "
          "checkpoint", file=sys.stderr, flush=True)
    _exit_now(errors.EXIT_PEER_FAILED)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _exit_now(code: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


_watchdog: PeerWatchdog | None = None


def start_watchdog(timeout_s: float, command: str) -> None:
  """Starts the PeerWatchdog of a multi-process run (no-op otherwise)."""
  global _watchdog
  if jax.process_count() > 1 and _watchdog is None:
    _watchdog = PeerWatchdog(timeout_s, command).start()


# Errors a collective raises when its peer is gone (gloo on CPU raises at
# once; the watchdog then tells which process failed).
_TRANSPORT = re.compile(r"gloo|nccl|connection|collective|heartbeat|"
                        r"coordination|unavailable|deadline|socket|peer",
                        re.IGNORECASE)


def after_error(exc: BaseException) -> None:
  """Called with an unexpected error before it is reported as a bug: in a
  multi-process run with a watchdog, a transport error waits for the
  watchdog's verdict on the peers (it exits with one line if one failed)."""
  if _watchdog is None or not _TRANSPORT.search(str(exc)):
    return
  deadline = time.monotonic() + 1.5 * _watchdog.timeout_s + 5
  while time.monotonic() < deadline and not _watchdog._stop.is_set():  # pylint: disable=protected-access
    time.sleep(0.2)


def exit_after_peer_failure(code: int) -> int:
  """Leaves a multi-process run at once (a normal exit would wait in the JAX
  client's shutdown for the failed peer, then abort); returns `code` in a
  single process."""
  if jax.process_count() > 1:
    if _watchdog is not None:
      _watchdog._stop.set()  # pylint: disable=protected-access
    _exit_now(code)
  return code
