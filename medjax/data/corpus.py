"""Plain-text documents for continued pretraining: readers and a stable train/val split.

Formats (chosen by file suffix; a folder is read recursively in sorted path order):

- `.txt`: documents are separated by a line that is exactly `<|endoftext|>` when the file has
  such a line (TinyStories), otherwise by one or more blank lines.
- `.jsonl`: one JSON object per line; the document is its `text` field.
- `.csv`: a header row; the document is the named `columns` joined by newlines. By default
  the known text columns `title, ask, answer` when present (the medical-dialogue CSV;
  `department` is a label, not text), otherwise every column.

Every document is a `Document(text, source)` with `source` = "file:line" for tracing.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from medjax.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".csv")
EOT = "<|endoftext|>"
# Text columns of known CSV corpora, used when `columns` is not given.
DEFAULT_TEXT_COLUMNS = ("title", "ask", "answer")


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  source: str  # "file:line"


def _raw_lines(path: Path) -> Iterator[tuple[int, str]]:
  """(line number, line with its line break) of a UTF-8 file, streamed."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  with f:
    for i, raw in enumerate(f, start=1):
      try:
        yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{i}: not UTF-8 (byte {e.start} of the line); re-encode the "
                        "file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  """(line number, line) without line breaks; str.splitlines' other separators (\r, \x0b,
  \u2028, ...) split a line further, as reading the whole file with splitlines did."""
  for i, line in _raw_lines(path):
    yield from ((i, part) for part in (line.splitlines() or [""]))


def _uses_eot(path: Path) -> bool:
  with open(path, "rb") as f:
    return any(ln.strip() == EOT.encode() for ln in f)


def _read_txt(path: Path) -> Iterator[Document]:
  use_eot = _uses_eot(path)
  buf, first = [], 0
  for i, ln in itertools.chain(_lines(path), [(0, EOT if use_eot else "")]):
    is_sep = ln.strip() == EOT if use_eot else not ln.strip()
    if is_sep:
      body = "\n".join(buf).strip()
      if body:
        yield Document(body, f"{path}:{first}")
      buf = []
    else:
      if not buf:
        first = i
      buf.append(ln)


def _read_jsonl(path: Path) -> Iterator[Document]:
  for i, ln in _lines(path):
    if not ln.strip():
      continue
    try:
      obj = json.loads(ln)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
      raise DataError(f"{path}:{i}: field 'text' missing or not a string")
    if obj["text"].strip():
      yield Document(obj["text"].strip(), f"{path}:{i}")


def _read_csv(path: Path, columns: Sequence[str] | None) -> Iterator[Document]:
  # csv reads fields that span lines from the line iterator; line_num counts them.
  reader = csv.reader(ln for _, ln in _raw_lines(path))
  header = [h.strip() for h in next(reader, [])]
  if not header:
    raise DataError(f"{path}: empty file (no header row)")
  if columns is None:
    known = [c for c in DEFAULT_TEXT_COLUMNS if c in header]
    columns = known or header
  missing = [c for c in columns if c not in header]
  if missing:
    raise DataError(f"{path}:1: missing column {missing[0]!r} (header: {', '.join(header)})")
  idx = [header.index(c) for c in columns]
  start = reader.line_num + 1
  for row in reader:
    line, start = start, reader.line_num + 1
    parts = [row[i].strip() for i in idx if i < len(row) and row[i].strip()]
    if parts:
      yield Document("\n".join(parts), f"{path}:{line}")


def list_files(path: str | os.PathLike) -> list[Path]:
  """The corpus files under `path` (itself if a file), sorted for a stable order."""
  p = Path(path)
  if p.is_dir():
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
      raise DataError(f"{p}: no {'/'.join(SUFFIXES)} files in folder")
    return files
  if not p.exists():
    raise DataError(f"{p}: no such file or folder")
  if p.suffix.lower() not in SUFFIXES:
    raise DataError(f"{p}: unsupported corpus format {p.suffix!r} (use {', '.join(SUFFIXES)})")
  return [p]


def iter_documents(paths: str | os.PathLike | Sequence[str | os.PathLike],
                   columns: Sequence[str] | None = None) -> Iterator[Document]:
  """Streams documents from files and folders, one line at a time (memory: one document).

  Args:
    paths: a file or folder, or a list of them.
    columns: for `.csv` files, the columns joined into a document (see module docstring).

  Yields:
    Documents in file order.

  Raises:
    DataError: a missing, non-UTF-8, malformed or empty file (named with its line).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  for p in paths:
    for f in list_files(p):
      suffix = f.suffix.lower()
      if suffix == ".txt":
        got = _read_txt(f)
      elif suffix == ".jsonl":
        got = _read_jsonl(f)
      else:
        got = _read_csv(f, columns)
      n = 0
      for n, d in enumerate(got, start=1):
        yield d
      if not n:
        raise DataError(f"{f}: no documents (empty file)")


def read_documents(paths: str | os.PathLike | Sequence[str | os.PathLike],
                   columns: Sequence[str] | None = None) -> list[Document]:
  """All documents of `iter_documents(paths, columns)`, as a list."""
  return list(iter_documents(paths, columns))


def read_texts(paths, columns: Sequence[str] | None = None) -> list[str]:
  """Like `read_documents`, returning only the texts."""
  return [d.text for d in read_documents(paths, columns)]


def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
  """Whether a document belongs to the validation split (stable across runs and machines)."""
  h = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
  return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


def split_documents(docs: Sequence, val_fraction: float, seed: int = 0) -> tuple[list, list]:
  """Splits documents into train and validation by a hash of their text.

  The split of a document depends only on its text and `seed`, not on its position, so
  adding files to a corpus never moves existing documents between splits, and identical
  documents always land on the same side.

  Args:
    docs: `Document`s or strings.
    val_fraction: expected share of validation documents, in [0, 1].
    seed: changes which documents are held out.

  Returns:
    (train, validation), each in input order.
  """
  if not 0.0 <= val_fraction <= 1.0:
    raise DataError(f"val_fraction={val_fraction} must be in [0, 1]")
  train, val = [], []
  for d in docs:
    text = d.text if isinstance(d, Document) else d
    (val if is_validation(text, val_fraction, seed) else train).append(d)
  return train, val
