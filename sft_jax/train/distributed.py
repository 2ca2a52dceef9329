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
"""

import os

import jax


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
               process_id: int | None = None) -> tuple[int, int]:
  """Starts `jax.distributed` when the job spans several processes.

  Args:
    coordinator: "host:port" of process 0, or None to auto-detect.
    num_processes: total number of processes (with `coordinator`).
    process_id: this process's index in [0, num_processes) (with
      `coordinator`).

  Returns:
    (process_index, process_count) after initialisation.
  """
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
      jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _cluster_detected():
    _use_gloo_on_cpu()
    jax.distributed.initialize()
  return jax.process_index(), jax.process_count()


def _use_gloo_on_cpu() -> None:
  # Must happen before the CPU backend exists; harmless on GPU/TPU, whose
  # collectives do not go through this setting.
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(
      jax.config.jax_platforms or "")
  if not platforms or "cpu" in platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


class BarrierTimeoutError(RuntimeError):
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


class MainProcessFailedError(RuntimeError):
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
