"""Tokenizing a large source with worker processes, results in file order.

Rendering chat templates (Jinja) and building masks is Python holding the
GIL, about three quarters of the time per record; the fast tokenizer's own
batch call is already parallel in Rust. So the parallelism that pays is one
of processes, each rendering and tokenizing whole chunks of records.

Workers cost seconds to start (importing transformers and JAX once, in the
fork server, then unpickling the tokenizer in each). Three things keep that
from making a source slower:
a source too small to repay it gets no pool (`auto_workers`); chunks are
large, so pickling is a small share of a chunk's work; and the parent keeps
encoding chunks itself while the workers start and whenever all of them are
busy, instead of waiting for them. Results are yielded in chunk order, so the
cache is byte-identical to one process's.
"""

import collections
import logging
import os

# The fork server starts in ~2.5 CPU seconds, each worker in well under one;
# at ~2,000 chat records (~1 MB of JSONL) per CPU second, 4 MB per worker is
# several times that.
_BYTES_PER_WORKER = 4 << 20
_MAX_WORKERS = 64
_QUEUED_PER_WORKER = 4  # chunks waiting per worker before the parent helps
_MAX_PENDING = 64  # chunks held for ordering (bounds the parent's memory)


def cpu_count() -> int:
  """CPUs this process may run on (the affinity mask, not the machine)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def auto_workers(local_bytes: int | None, cpus: int | None = None) -> int:
  """Worker processes for a source of `local_bytes` (None: unknown size,
  a hub dataset): one per CPU but the parent's, at most one per
  `_BYTES_PER_WORKER`; 1 means no pool.

  The parent keeps a CPU busy reading, writing and encoding (its Rust batch
  calls use every CPU), so on 2 CPUs a pool only adds start-up and pickling:
  measured slower there (scripts/measure_ingest.py tokenize).
  """
  cpus = cpu_count() if cpus is None else cpus
  n = min(cpus - 1, _MAX_WORKERS)
  if local_bytes is not None:
    n = min(n, local_bytes // _BYTES_PER_WORKER)
  return max(1, n)


def ordered_map(fn, chunks, *, workers: int, inline_first: int, init,
                initargs, here, preload=()):
  """Yields the result of each chunk, in order: here(chunk) in this process,
  fn(chunk) in a worker (the same result).

  The first `inline_first` chunks are encoded here (a small source never
  starts a pool); after that, with `workers` > 1, chunks go to `workers`
  spawned processes set up by `init(*initargs)`, except while every worker
  already has `_QUEUED_PER_WORKER` chunks waiting: then this process encodes
  the chunk itself. `fn`, `init` and `initargs` must be picklable;
  `preload` names modules the workers import before forking (see _context).
  """
  chunks = iter(chunks)
  if workers <= 1:
    yield from map(here, chunks)
    return
  for _ in range(inline_first):
    items = next(chunks, None)
    if items is None:
      return
    yield here(items)
  first = next(chunks, None)
  if first is None:
    return
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  # An executor, not a multiprocessing.Pool: a worker that dies (killed, out
  # of memory) or cannot start (a script without a __main__ guard) breaks
  # the pool instead of leaving its chunk unanswered forever; the chunks it
  # held, and all after them, are then encoded here.
  pool = futures.ProcessPoolExecutor(workers, mp_context=_context(preload),
                                     initializer=init, initargs=initargs)
  broken = []

  def fall_back(e, items):
    if not broken:
      broken.append(e)
      logging.getLogger("sft_jax").warning(
          "tokenizer worker processes failed (%s); tokenizing in this "
          "process instead", e)
    return here(items)

  def submit(items):
    try:
      return pool.submit(fn, items)
    except futures.process.BrokenProcessPool as e:
      return fall_back(e, items)

  def result(entry):
    items, p = entry
    if isinstance(p, list):
      return p
    try:
      return p.result()
    except futures.process.BrokenProcessPool as e:
      return fall_back(e, items)

  try:
    pending = collections.deque()  # (chunk, Future or its result here)
    for items in _prepend(first, chunks):
      queued = sum(1 for _, p in pending
                   if not isinstance(p, list) and not p.done())
      if not broken and queued < workers * _QUEUED_PER_WORKER:
        pending.append((items, submit(items)))
      else:
        pending.append((items, here(items)))
      while pending and (isinstance(pending[0][1], list) or
                         pending[0][1].done() or len(pending) > _MAX_PENDING):
        yield result(pending.popleft())
    while pending:
      yield result(pending.popleft())
  finally:
    # Also on an early stop (a strict-mode error): never wait for the rest.
    pool.shutdown(wait=False, cancel_futures=True)


def _context(preload):
  """Workers fork from a fork server, not from this process (which may hold
  JAX or tokenizer threads, unsafe to fork) and are not spawned afresh (each
  would import transformers and JAX again: seconds of CPU apiece). The server
  starts once per process, imports `preload`, and stays for later sources."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  try:
    ctx = multiprocessing.get_context("forkserver")
  except ValueError:  # a platform without fork
    return multiprocessing.get_context("spawn")
  ctx.set_forkserver_preload(list(preload))
  return ctx


def _prepend(first, rest):
  yield first
  yield from rest


def quiet_tokenizer_threads() -> None:
  """In a worker: one Rust thread, since the workers already fill the CPUs."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
