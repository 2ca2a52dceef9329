"""Reading raw records, each with its place (`file:line` or `file#row`).

JSONL and JSON are parsed here so a malformed line is named by file and line;
Parquet, CSV and hub datasets are read with `datasets` (streamed by default).
A malformed record is yielded as a `RecordError` in place of the record, so
the caller counts it and goes on (or stops, in strict mode).
"""

import glob
import gzip
import hashlib
import json
import os
import re
from typing import Iterator

from sft_jax.data.errors import DataError, RecordError

_LOCAL_EXTS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_spec: str) -> tuple[list[str], str | None]:
  """Splits "a.jsonl,dir/*.parquet" into sorted local files, or a hub id.

  Returns (files, hub_id); exactly one of them is non-empty.
  """
  files = []
  parts = [p.strip() for p in str(path_spec).split(",") if p.strip()]
  if not parts:
    raise DataError("a data source has an empty path")
  if len(parts) == 1 and _HUB_ID.match(parts[0]) and not os.path.exists(
      os.path.expanduser(parts[0])) and not parts[0].endswith(_LOCAL_EXTS):
    return [], parts[0]
  for part in parts:
    matches = sorted(glob.glob(os.path.expanduser(part)))
    if not matches:
      raise DataError(f"{part}: no such file (and no file matches the glob)")
    for m in matches:
      if os.path.isdir(m):
        raise DataError(f"{m}: is a directory; give files or a glob")
      if not m.endswith(_LOCAL_EXTS):
        raise DataError(f"{m}: unknown file type; expected one of "
                        f"{', '.join(_LOCAL_EXTS)}")
      files.append(m)
  return files, None


def fingerprint(src) -> str:
  """Identifies a source's bytes cheaply: path, size and mtime of each file."""
  files, hub = resolve(src.path)
  h = hashlib.sha256()
  if hub:
    h.update(json.dumps([hub, src.subset, src.split, src.revision]).encode())
  for f in files:
    st = os.stat(f)
    h.update(json.dumps([os.path.abspath(f), st.st_size,
                         st.st_mtime_ns]).encode())
  return h.hexdigest()


def _read_jsonl(path: str) -> Iterator[tuple[str, object]]:
  opener = gzip.open if path.endswith(".gz") else open
  # Bytes, decoded line by line: a bad byte costs its record, not the file.
  with opener(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield where, RecordError("bad_utf8", f"byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1} is not UTF-8")
        continue
      if not line.strip():
        continue  # blank lines are layout, not records
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        yield where, RecordError("malformed_json", f"{e.msg} at column {e.colno}")


def _read_json(path: str) -> Iterator[tuple[str, object]]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column "
                    f"{e.colno}") from None
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON list of records, got "
                    f"{type(records).__name__}")
  for i, r in enumerate(records):
    yield f"{path}#{i}", r


def _read_with_datasets(kind: str, path: str, streaming: bool):
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_dataset(kind, data_files=path, split="train",
                               streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: cannot read as {kind}: {e}") from e
  # CSV line numbers: a header line, then one record per line.
  for i, r in enumerate(ds):
    yield (f"{path}:{i + 2}" if kind == "csv" else f"{path}#{i}"), r


def _read_hub(src, hub_id: str):
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_dataset(hub_id, name=src.subset or None,
                               split=src.split, revision=src.revision or None,
                               streaming=src.streaming)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"hub dataset {hub_id!r} (subset={src.subset!r}, "
                    f"split={src.split!r}): cannot load: {e}") from e
  for i, r in enumerate(ds):
    yield f"{hub_id}[{src.split}]#{i}", r


def read_records(src) -> Iterator[tuple[str, object]]:
  """Yields (where, record or RecordError) for every record of a source."""
  files, hub = resolve(src.path)
  n = 0
  if hub:
    streams = [_read_hub(src, hub)]
  else:
    streams = []
    for f in files:
      if f.endswith((".jsonl", ".jsonl.gz")):
        streams.append(_read_jsonl(f))
      elif f.endswith(".json"):
        streams.append(_read_json(f))
      else:
        kind = "parquet" if f.endswith(".parquet") else "csv"
        streams.append(_read_with_datasets(kind, f, src.streaming))
  for stream in streams:
    for item in stream:
      yield item
      n += 1
      if src.max_records and n >= src.max_records:
        return
