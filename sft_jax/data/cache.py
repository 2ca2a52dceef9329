"""Tokenize a source once and keep it on disk, memory-mapped on later runs.

The cache key covers everything that changes the tokens: the source files
(path, size, mtime) or hub id, the tokenizer, the chat template, the format,
field names and mask policy. Mixture weights, seed and sequence length are not
in it, so changing them never re-tokenizes. Records stream through: tokens are
appended to disk as they come, so a large source never sits in memory.

Layout of one entry: ids.bin (int32), mask.bin (uint8), offsets.npy
(int64 [N + 1]), where.npy (int64 [N, 2]: file index, line or row), meta.json
(files, detected format, drop log).
"""

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile

import numpy as np

from sft_jax.data import formats
from sft_jax.data import render
from sft_jax.data import sources
from sft_jax.data import workers as workers_lib
from sft_jax.data.errors import DataError, DropLog, RecordError, RenderLog

_VERSION = 2  # bump when the encoding rules change


@dataclasses.dataclass
class TokenizedSource:
  """A tokenized source: example i is ids[offsets[i]:offsets[i + 1]]."""
  name: str
  ids: np.ndarray  # int32 [total tokens]
  mask: np.ndarray  # uint8 [total tokens], 1 = supervised (before shifting)
  offsets: np.ndarray  # int64 [N + 1]
  where_idx: np.ndarray  # int64 [N, 2]: (file index, line or row)
  files: list  # [(file name, separator)]; separator ":" line, "#" row
  fmt: str  # the format records were read as
  drops: DropLog  # records rejected while tokenizing
  cache_path: str
  render: RenderLog = dataclasses.field(default_factory=RenderLog)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    return np.asarray(self.ids[a:b]), np.asarray(self.mask[a:b])

  def where(self, i: int) -> str:
    f, n = self.where_idx[i]
    name, sep = self.files[int(f)]
    return f"{name}{sep}{int(n)}"


def cache_key(src, tok, template: str | None) -> str:
  fields = {k: src.fields[k] for k in sorted(src.fields.keys())}
  blob = json.dumps(dict(
      version=_VERSION, path=src.path, data=sources.fingerprint(src),
      tokenizer=render.tokenizer_fingerprint(tok), template=template,
      format=src.format, fields=fields, mask=src.mask,
      prompt_as_user_turn=src.prompt_as_user_turn,
      template_kwargs=template_kwargs(src), history=src.history,
      max_records=src.max_records), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def template_kwargs(src) -> dict:
  """The source's chat_template_kwargs as a plain dict."""
  kwargs = src.chat_template_kwargs
  return dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)


def make_encoder(tok, template, src) -> render.Encoder:
  return render.Encoder(tok, template, src.mask, src.prompt_as_user_turn,
                        template_kwargs(src), src.history)


def _split_where(where: str) -> tuple[str, str, int]:
  cut = max(where.rfind(":"), where.rfind("#"))
  return where[:cut], where[cut], int(where[cut + 1:])


_CHUNK = 256  # records per batched tokenizer call (and per worker task)
_INLINE_CHUNKS = 4  # encoded in-process before any worker starts
_WORKER_ENCODER = None  # set in each tokenizer worker process


def _init_worker(tok, template, src):
  global _WORKER_ENCODER
  workers_lib.quiet_tokenizer_threads()
  _WORKER_ENCODER = make_encoder(tok, template, src)


def resolve_workers(workers: int, src) -> int:
  """data.tokenize_workers, with 0 (auto) chosen from the CPUs and the
  source's size (see workers.auto_workers)."""
  if workers > 0:
    return workers
  files, hub = sources.resolve(src.path)
  return workers_lib.auto_workers(
      None if hub else sum(os.path.getsize(f) for f in files))


def _encode_chunk(items, encoder=None):
  """[(where, Example | RecordError)] ->
  [(where, (Encoded, is chat) | RecordError | DataError)]."""
  encoder = encoder or _WORKER_ENCODER
  results = iter(encoder.encode_batch(
      [x for _, x in items if not isinstance(x, RecordError)]))
  out = []
  for w, x in items:
    if isinstance(x, RecordError):
      out.append((w, x))
      continue
    r = next(results)
    chat = x.kind == "chat" or (x.kind == "prompt_completion" and
                                encoder.template is not None and
                                encoder.prompt_as_user_turn)
    out.append((w, r if isinstance(r, Exception) else (r, chat)))
  return out


def encode_records(src, tok, template, *, strict: bool, drops: DropLog,
                   workers: int = 1, log: RenderLog | None = None):
  """Yields the detected format first, then (where, ids, mask) per example.

  A record makes one example, or several when its template rewrites history
  (counted in `log`, with generation-marker disagreements). Rejected records
  are counted in `drops` (or raise DataError when strict, at the first bad
  record in file order; so does a marker disagreement). Records are tokenized
  in chunks with one batched tokenizer call each; past the first few chunks
  (a large source), chunks also go to `workers` processes (workers.py), with
  results in file order either way.
  """
  fmt = [src.format]
  log = log if log is not None else RenderLog()
  encoder = make_encoder(tok, template, src)

  def chunks():
    items = []
    for where, record in sources.read_records(src):
      try:
        if isinstance(record, RecordError):
          raise record
        if fmt[0] == "auto":
          try:
            fmt[0] = formats.detect(record, src.fields)
          except DataError as e:
            raise DataError(f"{where}: {e}") from None
        items.append((where, formats.to_example(record, fmt[0], src.fields)))
      except RecordError as e:
        items.append((where, e))
      if len(items) == _CHUNK:
        yield items
        items = []
    if items:
      yield items

  def encode_here(items):
    return _encode_chunk(items, encoder)

  def encoded(stream):
    yield encode_here(next(stream, []))  # the format is known after it
    yield from workers_lib.ordered_map(
        _encode_chunk, stream, workers=workers, inline_first=_INLINE_CHUNKS - 1,
        init=_init_worker, initargs=(tok, template, src), here=encode_here,
        preload=(__name__, type(tok).__module__))

  results = encoded(chunks())
  first = next(results)  # reads the first chunk: the format is known now
  yield fmt[0]
  for items in itertools.chain([first], results):
    for where, result in items:
      if isinstance(result, DataError):
        results.close()
        raise DataError(f"{where}: {result}")
      if isinstance(result, RecordError):
        if strict:
          results.close()
          raise DataError(f"{where}: {result.reason}: {result.detail}")
        drops.add(result.reason, where, result.detail)
      else:
        encoded, chat = result
        if strict and encoded.markers:
          results.close()
          raise DataError(
              f"{where}: the chat template's {{% generation %}} markers "
              f"disagree with the mask rule at {encoded.markers}")
        log.add(where, encoded, chat)
        for ids, mask in encoded.examples:
          yield where, ids, mask


def tokenize_source(name: str, src, tok, template: str | None, *,
                    cache_dir: str, strict: bool = False,
                    workers: int = 1) -> TokenizedSource:
  """Loads a source's tokens from the cache, building the entry if missing."""
  cache_dir = os.path.expanduser(cache_dir)
  key = cache_key(src, tok, template)
  path = os.path.join(cache_dir, f"{name}-{key}")
  if not os.path.exists(os.path.join(path, "meta.json")):
    _build(path, src, tok, template, strict=strict,
           workers=resolve_workers(workers, src), name=name)
  out = _load(name, path)
  if strict and out.drops.total:
    raise out.drops.first_error(f"source {name!r}")
  if strict and out.render.markers_disagree:
    raise DataError(f"source {name!r}: the chat template's {{% generation %}} "
                    "markers disagree with the mask rule at "
                    f"{out.render.first_disagreement}")
  if not len(out):
    raise DataError(no_examples_message(f"source {name!r} ({src.path})",
                                        out.drops))
  return out


def no_examples_message(what: str, drops: DropLog) -> str:
  """A source that yields nothing is an error, never "wrote 0 examples"."""
  reasons = "; ".join(
      f"{reason}: {n} (e.g. {(drops.examples.get(reason) or ['?'])[0]})"
      for reason, n in sorted(drops.counts.items(), key=lambda kv: -kv[1]))
  return (f"{what} yields 0 examples"
          + (f": every record was dropped ({reasons})" if reasons else
             ": it has no records"))


def _build(path, src, tok, template, *, strict, workers, name="source"):
  from sft_jax import progress  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
  meter = progress.Meter(f"tokenizing source {name!r}", "examples")
  try:
    drops, log = DropLog(), RenderLog()
    offsets, where_idx, files = [0], [], {}
    stream = encode_records(src, tok, template, strict=strict, drops=drops,
                            workers=workers, log=log)
    fmt = next(stream)
    with open(os.path.join(tmp, "ids.bin"), "wb") as fi, open(
        os.path.join(tmp, "mask.bin"), "wb") as fm:
      for where, ids, mask in stream:
        fi.write(ids.astype(np.int32).tobytes())
        fm.write(mask.astype(np.uint8).tobytes())
        offsets.append(offsets[-1] + len(ids))
        fname, sep, n = _split_where(where)
        where_idx.append((files.setdefault((fname, sep), len(files)), n))
        meter.update()
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    np.save(os.path.join(tmp, "where.npy"),
            np.asarray(where_idx, np.int64).reshape(-1, 2))
    meta = dict(format=fmt, files=[list(f) for f in files],
                drops=drops.to_json(), num_examples=len(offsets) - 1,
                render=log.to_json())
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f)
    # A source with no examples is an error of its own (one line), so no
    # summary line goes before it.
    meter.close(
        None if not meter.n else
        f"tokenized source {name!r}: {meter.n:,} examples, "
        f"{offsets[-1]:,} tokens in {progress.duration(meter.elapsed)} "
        f"({meter.n / max(meter.elapsed, 1e-9):,.0f} examples/s, "
        f"{offsets[-1] / max(meter.elapsed, 1e-9):,.0f} tokens/s); "
        f"cached in {path}")
    try:
      os.rename(tmp, path)
    except OSError:  # another process finished the same entry first
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    meter.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _mmap(path, dtype):
  if os.path.getsize(path) == 0:
    return np.zeros(0, dtype)
  return np.memmap(path, dtype=dtype, mode="r")


def _load(name, path) -> TokenizedSource:
  with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  return TokenizedSource(
      name=name, ids=_mmap(os.path.join(path, "ids.bin"), np.int32),
      mask=_mmap(os.path.join(path, "mask.bin"), np.uint8),
      offsets=np.load(os.path.join(path, "offsets.npy")),
      where_idx=np.load(os.path.join(path, "where.npy")),
      files=[tuple(f) for f in meta["files"]], fmt=meta["format"],
      drops=DropLog.from_json(meta["drops"]), cache_path=path,
      render=RenderLog.from_json(meta["render"]))
