"""Tokenized builds: packed rows of token ids in ArrayRecord files, a manifest, random access.

`medjax data build NAME --tokenizer PATH` (`data.build_tokenized`) tokenizes a corpus once and
writes `OUT/NAME/tokenized/`:

  manifest.json                       what was built, from what, with which tokenizer
  train-00000.array_record, ...       one record per packed row, `group_size:1` (random access)
  validation-00000.array_record, ...

Why packed rows and not documents: reading a row for training is then one record read, and
the whole order is grain's index shuffle over row numbers. Nothing per document (offsets,
lengths, a permutation) is loaded, so the time to the first batch and the memory of each
process do not grow with the corpus. The price: the row length is fixed when building. A
CPT run may use any `seq_len` that divides it (a stored row is cut into parts, exactly the
rows concat packing at that length gives); SFT rows ("fit" packing, examples never split
when they fit) must be read at the length they were built with.

A record is one row cut from the packed token stream plus, when the row's last document
continues in the next row, that document's next token (so the row's last target is not
lost). Layout, little endian:

  uint32[4]         magic "MJR1", n tokens, n starts, flags (1: weights, 2: uint32 ids)
  uint32[n_starts]  positions in the row where a document starts
  uint16|uint32[n]  token ids (uint16 when the vocabulary fits)
  uint8[n]          with flag 1 (SFT): 1 where the target of token i is trained

`row_fields` turns a record (or one part of it) into the batch row of `packing.FIELDS`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from medjax.errors import DataError

SUBDIR = "tokenized"
MANIFEST = "manifest.json"
FORMAT = "medjax-tokenized-rows"
VERSION = 1
MAGIC = 0x31524A4D  # b"MJR1" read as little-endian uint32
_WEIGHTS, _WIDE = 1, 2
# ArrayRecord: one record per chunk (random access reads one row), zstd (~half the bytes).
WRITER_OPTIONS = "group_size:1,zstd:3"


def fingerprint(path: str | os.PathLike) -> str:
  """sha256 of a tokenizer file's bytes: two tokenizers with the same ids have the same file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def encode_row(tokens: np.ndarray, starts: np.ndarray, weights: np.ndarray | None = None,
               wide: bool = False) -> bytes:
  """One record: a row's token ids, its document starts and (SFT) its loss weights."""
  flags = (_WEIGHTS if weights is not None else 0) | (_WIDE if wide else 0)
  head = np.array([MAGIC, len(tokens), len(starts), flags], "<u4")
  parts = [head.tobytes(), np.asarray(starts, "<u4").tobytes(),
           np.asarray(tokens, "<u4" if wide else "<u2").tobytes()]
  if weights is not None:
    parts.append(np.asarray(weights, np.uint8).tobytes())
  return b"".join(parts)


def decode_row(buf: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(tokens, starts, weights or None) of one record; ValueError if it is not one."""
  if len(buf) < 16:
    raise ValueError(f"{len(buf)}-byte record")
  magic, n, ns, flags = np.frombuffer(buf, "<u4", 4).tolist()
  itemsize = 4 if flags & _WIDE else 2
  want = 16 + 4 * ns + itemsize * n + (n if flags & _WEIGHTS else 0)
  if magic != MAGIC or len(buf) != want:
    raise ValueError("not a medjax row record")
  starts = np.frombuffer(buf, "<u4", ns, 16)
  tokens = np.frombuffer(buf, "<u4" if itemsize == 4 else "<u2", n, 16 + 4 * ns)
  weights = None
  if flags & _WEIGHTS:
    weights = np.frombuffer(buf, np.uint8, n, 16 + 4 * ns + itemsize * n)
  return tokens, starts, weights


def trained_in_row(n_tokens: int, row_len: int, starts: np.ndarray,
                   weights: np.ndarray | None) -> int:
  """Targets trained in a record's first `row_len` tokens (`row_fields`' loss_mask sum)."""
  k = min(row_len, n_tokens - 1)
  if k <= 0:
    return 0
  if weights is None:
    return k - int(np.count_nonzero((starts >= 1) & (starts <= k)))
  inside = np.ones(k, bool)  # the target of token i is token i+1 of the same document
  s = starts[(starts >= 1) & (starts <= k)]
  inside[s - 1] = False
  if weights is not None:
    inside &= weights[:k].astype(bool)
  return int(inside.sum())


def row_fields(tokens: np.ndarray, starts: np.ndarray, weights: np.ndarray | None,
               begin: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch row (`packing.FIELDS`) of a record's tokens [begin, begin + seq_len).

  Segments restart at every document start and at `begin` (a document continued from the
  previous row is a new segment with positions from 0, as in `packing.PackedRows`); the
  target of token i is token i+1 when both are in the same document (and weights[i] is 1).
  """
  T = seq_len
  tok = np.asarray(tokens[begin:begin + T + 1], np.int32)
  m = min(T, len(tok))  # real tokens in this row; the one after them is a lookahead
  is_start = np.zeros(len(tok) + 1, bool)
  s = starts.astype(np.int64) - begin
  is_start[s[(s >= 0) & (s < len(tok))]] = True
  new_seg = is_start[:m].copy()
  new_seg[:1] = True
  idx = np.arange(m)
  row = {"inputs": np.full(T, pad_id, np.int32), "targets": np.full(T, pad_id, np.int32),
         "loss_mask": np.zeros(T, np.float32), "segment_ids": np.zeros(T, np.int32),
         "positions": np.zeros(T, np.int32)}
  row["inputs"][:m] = tok[:m]
  row["segment_ids"][:m] = np.cumsum(new_seg)
  row["positions"][:m] = idx - np.maximum.accumulate(np.where(new_seg, idx, 0))
  k = min(m, len(tok) - 1)
  if k > 0:
    keep = ~is_start[1:k + 1]  # the next token is in the same document
    row["targets"][:k] = np.where(keep, tok[1:k + 1], pad_id)
    if weights is not None:
      keep &= weights[begin:begin + k].astype(bool)
    row["loss_mask"][:k] = keep
  return row


class BuiltRows:
  """Random access to the rows of one split of a build (a grain source: len, getitem).

  Records are read through grain's `ArrayRecordDataSource`, one record per row; nothing is
  read until a row is asked for, and a file's reader holds only its chunk index (8 bytes
  per row) in memory. With `seq_len` a divisor of the build's row length, each stored row
  gives `parts` rows.
  """

  def __init__(self, files: list[tuple[str, int]], built_len: int, seq_len: int,
               last_row_tokens: int, trained_tokens: int, pad_id: int):
    import grain
    self.seq_len, self.pad_id, self.trained_tokens = seq_len, pad_id, trained_tokens
    self.parts = built_len // seq_len
    self._files = [f for f, _ in files]
    self._ends = np.cumsum([n for _, n in files]).tolist()
    records = self._ends[-1] if self._ends else 0
    last = -(-last_row_tokens // seq_len)  # the last stored row may be short
    self._len = max(records - 1, 0) * self.parts + (last if records else 0)
    # "path[0:n]" gives the record count, so no file is opened here.
    self._src = grain.sources.ArrayRecordDataSource(
        [f"{f}[0:{n}]" for f, n in files]) if records else None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    r, part = divmod(int(i), self.parts)
    try:
      tokens, starts, weights = decode_row(self._src[r])
    except Exception as e:  # the reader's own errors (corrupt chunk, short file) differ
      f = bisect.bisect_right(self._ends, r)
      first = self._ends[f - 1] if f else 0
      raise DataError(f"{self._files[f]}: record {r - first} is unreadable "
                      f"({str(e).splitlines()[0][:200]}); rebuild the dataset") from None
    return row_fields(tokens, starts, weights, part * self.seq_len, self.seq_len, self.pad_id)


def find(data_dir: str | os.PathLike, name: str) -> Path | None:
  """`DATA_DIR/NAME/tokenized` when it holds a build (a manifest), else None."""
  p = Path(data_dir) / name / SUBDIR
  return p if (p / MANIFEST).exists() else None


class Build:
  """An opened build: its checked manifest and its splits."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)
    path = self.root / MANIFEST
    try:
      m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise DataError(f"{path}: not a medjax tokenized build manifest")
    if m.get("version") != VERSION:
      raise DataError(f"{path}: build format version {m.get('version')}, this medjax reads "
                      f"{VERSION}; rebuild with `medjax data build`")
    missing = [k for k in ("kind", "seq_len", "tokenizer", "splits") if k not in m]
    if missing or not isinstance(m["splits"], dict) or "sha256" not in m["tokenizer"]:
      raise DataError(f"{path}: manifest lacks {', '.join(missing) or 'tokenizer.sha256'}; "
                      "rebuild the dataset")
    self.manifest, self.path = m, path

  @property
  def kind(self) -> str:
    return self.manifest["kind"]

  @property
  def seq_len(self) -> int:
    return int(self.manifest["seq_len"])

  def has(self, split: str) -> bool:
    return split in self.manifest["splits"]

  def check_tokenizer(self, tokenizer) -> None:
    """Refuses a build made with another tokenizer (the ids would mean other pieces)."""
    want = self.manifest["tokenizer"]["sha256"]
    got = fingerprint(tokenizer.path)
    if got != want:
      raise DataError(f"{self.path}: built with tokenizer sha256 {want[:16]} "
                      f"({self.manifest['tokenizer']['path']}), but this run's tokenizer "
                      f"{tokenizer.path} has sha256 {got[:16]}; rebuild with --tokenizer "
                      f"{tokenizer.path}")

  def check_seq_len(self, seq_len: int) -> None:
    """A CPT build serves any divisor of its row length; an SFT build only that length."""
    n = self.seq_len
    if (self.kind == "sft" and seq_len != n) or n % seq_len:
      need = "equal" if self.kind == "sft" else "divide"
      raise DataError(f"{self.path}: data.seq_len={seq_len} must {need} the build's row "
                      f"length {n}; rebuild with --seq-len {seq_len}")

  def rows(self, split: str, seq_len: int, pad_id: int) -> BuiltRows:
    """The split's rows, after checking its files against the manifest (present, sizes,
    record counts), so a truncated or replaced file stops the run before training."""
    self.check_seq_len(seq_len)
    info, files = self._files(split)
    return BuiltRows(files, self.seq_len, seq_len, int(info["last_row_tokens"]),
                     int(info["trained_tokens"]), pad_id)

  def _files(self, split: str):
    """(split info, [(path, records)]) after checking each file against the manifest."""
    info = self.manifest["splits"].get(split)
    if info is None:
      raise DataError(f"{self.path}: no split {split!r} (have "
                      f"{', '.join(self.manifest['splits']) or 'none'})")
    if not info["rows"]:
      raise DataError(f"{self.path}: split {split!r} has no rows")
    files = []
    for f in info["files"]:
      p = self.root / f["name"]
      _check_file(p, int(f["bytes"]), int(f["records"]))
      files.append((str(p), int(f["records"])))
    return info, files


  def iter_rows(self, split: str, block: int = 256):
    """Yields (token ids, document starts) of each stored row in order, read sequentially
    (the packed token stream of the split, without lookahead tokens)."""
    from array_record.python import array_record_module
    for path, records in self._files(split)[1]:
      reader = array_record_module.ArrayRecordReader(path)
      try:
        for a in range(0, records, block):
          for k, buf in enumerate(reader.read(list(range(a, min(a + block, records))))):
            try:
              tokens, starts, _ = decode_row(buf)
            except ValueError as e:
              raise DataError(f"{path}: record {a + k} is unreadable ({e})") from None
            yield tokens[:self.seq_len], starts  # a row's real tokens: at most seq_len
      finally:
        reader.close()


  def iter_documents(self, split: str):
    """Yields (token ids, "SPLIT row R") of each document in stored order, its pieces
    joined across rows (memory: the longest document)."""
    pieces, first = [], 0
    for r, (tokens, starts) in enumerate(self.iter_rows(split)):
      cuts = [int(s) for s in starts if s < len(tokens)]
      for a, b in zip([0] + cuts, cuts + [len(tokens)]):
        if a in cuts and pieces:  # a document starts here: the previous one is complete
          yield np.concatenate(pieces), f"{split} row {first}"
          pieces = []
        if not pieces:
          first = r
        if b > a:
          pieces.append(tokens[a:b])
    if pieces:
      yield np.concatenate(pieces), f"{split} row {first}"


def _check_file(path: Path, size: int, records: int) -> None:
  from array_record.python import array_record_module
  try:
    got = path.stat().st_size
  except OSError:
    raise DataError(f"{path}: missing (listed in the build's manifest)") from None
  if got != size:
    raise DataError(f"{path}: {got} bytes, the manifest says {size} (truncated or replaced); "
                    "rebuild the dataset")
  try:
    r = array_record_module.ArrayRecordReader(str(path))
  except Exception as e:  # the reader raises its own types for a damaged footer
    raise DataError(f"{path}: not a readable ArrayRecord file "
                    f"({str(e).splitlines()[0][:200]})") from None
  try:
    n = r.num_records()
    if n != records:
      raise DataError(f"{path}: {n} records, the manifest says {records}; rebuild the "
                      "dataset")
    for k in sorted({0, n - 1}):  # the ends: a damaged file fails before any training
      try:
        decode_row(r.read([k])[0])
      except Exception as e:
        raise DataError(f"{path}: record {k} is unreadable "
                        f"({str(e).splitlines()[0][:200]}); rebuild the dataset") from None
  finally:
    try:
      r.close()
    except Exception:  # a damaged file also fails to close; the error above says why
      pass
