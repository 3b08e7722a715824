"""Tokenize once: `medjax data build NAME --tokenizer PATH` writes a tokenized build
(format and reading: `data.tokenized`).

  medical_text  documents (BOS + text + EOS) from corpus files, split into train and
                validation by a stable hash of each document, concat-packed into rows.
                The corpus is streamed: the main process parses files, packs and writes;
                worker processes (one per other core) tokenize chunks of documents, in
                order.
  cmexam        CMExam CSVs, split by file name (train/val/test), each question tokenized
                as prompt (not trained) + answer (+ explanation) + EOS, "fit"-packed.

The build is written to a temporary folder beside the target and renamed when complete, so
a failed or interrupted build never leaves a folder that looks finished.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from medjax.data import cmexam, corpus, tokenized
from medjax.data.packing import pack, tokenize_sft
from medjax.errors import DataError

CHUNK_CHARS = 1 << 20  # characters per tokenization task (~1M tokens of Chinese text)
TOKENS_PER_FILE = 1 << 28  # a new ArrayRecord file after ~268M tokens (~0.3-0.5 GB)
_SPLIT_WORDS = (("train", "train"), ("val", "validation"), ("dev", "validation"),
                ("test", "test"))


def split_of(path: Path) -> str:
  """The CMExam split a CSV belongs to, by its name; others are validation data."""
  name = path.stem.lower()
  return next((split for word, split in _SPLIT_WORDS if word in name), "validation")


class _RowWriter:
  """Rows of one split into `SPLIT-NNNNN.array_record` files, with the manifest's counts."""

  def __init__(self, root: Path, split: str, wide: bool):
    self.root, self.split, self.wide = root, split, wide
    self.files: list[dict] = []
    self.rows = self.tokens = self.trained = self.documents = self.last_row_tokens = 0
    self._w, self._file_tokens = None, 0

  def write(self, tokens: np.ndarray, n: int, starts: np.ndarray,
            weights: np.ndarray | None = None) -> None:
    """A row: its first `n` tokens (+ a lookahead token of the last document, if any)."""
    from array_record.python import array_record_module
    n = int(n)
    if self._w is None or self._file_tokens >= TOKENS_PER_FILE:
      self._close_file()
      name = f"{self.split}-{len(self.files):05d}.array_record"
      self._w = array_record_module.ArrayRecordWriter(str(self.root / name),
                                                      tokenized.WRITER_OPTIONS)
      self.files.append({"name": name, "records": 0})
      self._file_tokens = 0
    self._w.write(tokenized.encode_row(tokens, starts, weights, self.wide))
    self.files[-1]["records"] += 1
    self.rows += 1
    self.tokens += n
    self._file_tokens += n
    self.last_row_tokens = n
    self.trained += tokenized.trained_in_row(len(tokens), n, starts, weights)

  def _close_file(self):
    if self._w is not None:
      self._w.close()
      self.files[-1]["bytes"] = (self.root / self.files[-1]["name"]).stat().st_size
      self._w = None

  def close(self) -> dict:
    self._close_file()
    return {"files": self.files, "rows": self.rows, "tokens": self.tokens,
            "trained_tokens": self.trained, "documents": self.documents,
            "last_row_tokens": self.last_row_tokens}


class _ConcatPacker:
  """Cuts the stream of documents into rows of `seq_len` tokens as they arrive."""

  def __init__(self, seq_len: int, writer: _RowWriter, dtype):
    self.T, self.w = seq_len, writer
    self.buf = np.zeros(0, dtype)
    self.starts = np.zeros(0, np.int64)  # document starts, as positions in buf

  def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
    if not len(lengths):
      return
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + len(self.buf)
    self.buf = np.concatenate([self.buf, tokens])
    self.starts = np.concatenate([self.starts, first])
    self.w.documents += len(lengths)
    # A row is written once the token after it is known (its lookahead, or a new document).
    self._emit((len(self.buf) - 1) // self.T)

  def _emit(self, rows: int) -> None:
    T, cut = self.T, np.searchsorted(self.starts, np.arange(rows + 1) * self.T)
    for r in range(rows):
      a, b = r * T, min((r + 1) * T, len(self.buf))
      starts = self.starts[cut[r]:cut[r + 1]] - a
      continues = b < len(self.buf) and (cut[r + 1] == len(self.starts) or
                                         self.starts[cut[r + 1]] != b)
      self.w.write(self.buf[a:b + continues], b - a, starts)
    self.buf = self.buf[rows * T:]
    self.starts = self.starts[cut[rows]:] - rows * T

  def finish(self) -> None:
    if len(self.buf):
      self._emit(1)


# ------------------------------------------------------------- tokenization (worker side)

_worker_tok = None


def _init_worker(tok_class, tok_path) -> None:
  global _worker_tok
  _worker_tok = tok_class(tok_path)


def _encode(texts: list[str], val_fraction: float, seed: int, dtype, tok=None):
  """(flat ids, lengths, is-validation flags) of BOS + text + EOS per document."""
  ids = (tok or _worker_tok).encode_batch(texts, bos=True, eos=True)
  lengths = np.fromiter(map(len, ids), np.int64, len(ids))
  flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
  val = np.fromiter((corpus.is_validation(t, val_fraction, seed) for t in texts), bool,
                    len(texts))
  return flat, lengths, val


def _chunks(files: list[Path], columns):
  """(texts, file index per text) chunks of about CHUNK_CHARS characters, in corpus order."""
  texts, where, size = [], [], 0
  for i, f in enumerate(files):
    for d in corpus.iter_documents(f, columns):
      texts.append(d.text)
      where.append(i)
      size += len(d.text)
      if size >= CHUNK_CHARS:
        yield texts, np.asarray(where)
        texts, where, size = [], [], 0
  if texts:
    yield texts, np.asarray(where)


def _encoded_chunks(files, columns, tokenizer, workers: int, val_fraction, seed, dtype,
                    log=None):
  """Yields (chunk's file indices, _encode result) in order, tokenizing on `workers`
  processes with at most 2 chunks per worker in flight (memory stays bounded)."""
  chunks = _chunks(files, columns)
  pool = _start_pool(tokenizer, workers, log) if workers > 1 else None
  if pool is None:
    for texts, where in chunks:
      yield where, _encode(texts, val_fraction, seed, dtype, tokenizer)
    return
  with pool:
    pending = collections.deque()
    for texts, where in chunks:
      pending.append((where, pool.submit(_encode, texts, val_fraction, seed, dtype)))
      if len(pending) >= 2 * workers:
        w, fut = pending.popleft()
        yield w, _result(fut)
    while pending:
      w, fut = pending.popleft()
      yield w, _result(fut)


def _start_pool(tokenizer, workers: int, log):
  """A process pool with the tokenizer loaded in each worker, or None (with a note) when
  worker processes cannot start here (e.g. a parent whose __main__ spawn cannot re-import)."""
  from concurrent.futures import ProcessPoolExecutor
  # spawn: the parent may hold threads (jax, grain) that fork would copy mid-operation.
  pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker,
                             (type(tokenizer), str(tokenizer.path)))
  try:
    pool.submit(int).result()
    return pool
  except Exception as e:  # BrokenProcessPool and whatever the workers died of
    pool.shutdown(cancel_futures=True)
    if log:
      log(f"tokenizer worker processes did not start ({type(e).__name__}); "
          "tokenizing in this process")
    return None


def _result(fut):
  from concurrent.futures.process import BrokenProcessPool
  try:
    return fut.result()
  except BrokenProcessPool as e:
    raise DataError(f"a tokenizer worker process died ({e}); nothing was written") from None


# ------------------------------------------------------------------------------ builds


def _token_dtype(tokenizer):
  return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def _manifest(name, kind, tokenizer, seq_len, packing, input_path, splits, sources, extra):
  return {"format": tokenized.FORMAT, "version": tokenized.VERSION, "dataset": name,
          "kind": kind, "seq_len": seq_len, "packing": packing,
          "tokenizer": {"path": str(tokenizer.path),
                        "sha256": tokenized.fingerprint(tokenizer.path),
                        "vocab_size": tokenizer.vocab_size},
          "dtype": np.dtype(_token_dtype(tokenizer)).name, "input": str(input_path),
          "created": datetime.datetime.now().isoformat(timespec="seconds"),
          **extra, "splits": splits, "sources": sources}


def _write_build(out_dir, name: str, fill) -> Path:
  """Runs `fill(tmp_dir) -> manifest` and moves the result to OUT/NAME/tokenized."""
  import json
  final = Path(out_dir) / name / tokenized.SUBDIR
  created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.with_name(f"{tokenized.SUBDIR}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    manifest = fill(tmp)
    (tmp / tokenized.MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1),
                                          encoding="utf-8")
    if final.exists():
      old = final.with_name(f"{tokenized.SUBDIR}.old-{os.getpid()}")
      final.rename(old)
      shutil.rmtree(old)
    tmp.rename(final)
  except BaseException:  # bad input or interrupted: leave nothing behind
    shutil.rmtree(tmp, ignore_errors=True)
    for p in created:  # deepest first
      try:
        p.rmdir()
      except OSError:
        break
    raise
  return final


def build_text(input_path, out_dir, tokenizer, seq_len: int = 4096,
               val_fraction: float = 0.02, seed: int = 0, workers: int | None = None,
               columns=None, name: str = "medical_text", log=None) -> tuple[Path, dict]:
  """Tokenizes a corpus once into concat-packed rows (train / validation by hash).

  Args:
    input_path: corpus file or folder (`.txt`, `.jsonl`, `.csv`; `data.corpus`).
    out_dir: the data dir; the build lands in out_dir/NAME/tokenized.
    tokenizer: a `Tokenizer` (or anything with path, vocab_size, encode_batch).
    seq_len: stored row length; runs may read any divisor of it.
    val_fraction: share of documents held out for validation, by `corpus.is_validation`.
    seed: the hash seed of the split.
    workers: tokenizing processes; None = one per core but one; <= 1 = in this process
      (the tokenizer's batch encoder still uses every core).
    columns: CSV text columns (`corpus.read_documents`).
    name: the dataset name (the folder under out_dir).
    log: prints progress notes (None: silent).

  Returns:
    (build folder, manifest).
  """
  if seq_len < 2:
    raise DataError(f"--seq-len {seq_len}: must be at least 2")
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
  files = corpus.list_files(input_path)  # errors (missing, no corpus files) before writing
  # Default: one tokenizing process per core but one, which parses, packs and writes.
  workers = max(1, (os.cpu_count() or 1) - 1) if workers is None else workers
  dtype = _token_dtype(tokenizer)
  base = Path(input_path)
  names = [str(f.relative_to(base)) if base.is_dir() else f.name for f in files]

  def fill(tmp: Path) -> dict:
    t0 = time.perf_counter()
    writers = {s: _RowWriter(tmp, s, dtype == np.uint32) for s in ("train", "validation")}
    packers = {s: _ConcatPacker(seq_len, w, dtype) for s, w in writers.items()}
    per_file = np.zeros((len(files), 2, 2), np.int64)  # file, (train, val), (docs, tokens)
    for where, (flat, lengths, val) in _encoded_chunks(files, columns, tokenizer, workers,
                                                       val_fraction, seed, dtype, log):
      tok_val = np.repeat(val, lengths)
      packers["train"].add(flat[~tok_val], lengths[~val])
      packers["validation"].add(flat[tok_val], lengths[val])
      np.add.at(per_file, (where, val.astype(int), 0), 1)
      np.add.at(per_file, (where, val.astype(int), 1), lengths)
    splits = {}
    for s, p in packers.items():
      p.finish()
      info = writers[s].close()
      if info["rows"]:
        splits[s] = info
    if "train" not in splits:
      raise DataError(f"{input_path}: no training documents (all held out for validation?)")
    sources = {n: {s: {"documents": int(per_file[i, j, 0]), "tokens": int(per_file[i, j, 1])}
                   for j, s in enumerate(("train", "validation"))}
               for i, n in enumerate(names)}
    secs = time.perf_counter() - t0
    return _manifest(name, "cpt", tokenizer, seq_len, "concat", input_path, splits, sources,
                     {"validation_split": {"fraction": val_fraction, "seed": seed,
                                           "rule": "sha256(f'{seed}:{text}') of each "
                                                   "document, first 8 bytes / 2**64 < fraction"},
                      "build_seconds": round(secs, 2), "workers": max(workers, 1)})

  final = _write_build(out_dir, name, fill)
  return final, tokenized.Build(final).manifest


def build_cmexam(input_path, out_dir, tokenizer, seq_len: int = 1024,
                 with_explanation: bool = False) -> tuple[Path, dict, list]:
  """Tokenizes CMExam CSVs once into "fit"-packed SFT rows, one split per file name.

  Args:
    input_path: a CMExam CSV or a folder of them (`split_of` names the split).
    out_dir: the data dir; the build lands in out_dir/cmexam/tokenized.
    tokenizer: the run's tokenizer.
    seq_len: the row length (SFT runs must use it); longer examples are truncated as in
      `packing.tokenize_sft`.
    with_explanation: train on the answer and the explanation.

  Returns:
    (build folder, manifest, rows that could not be parsed).
  """
  root = Path(input_path)
  if not root.exists():
    raise DataError(f"{root}: no such file or folder")
  files = sorted(root.rglob("*.csv")) if root.is_dir() else [root]
  if not files:
    raise DataError(f"{root}: no .csv files")
  by_split: dict[str, list] = {}
  problems, sources = [], {}
  for f in files:
    qs, bad = cmexam.read_cmexam(f)
    problems.extend(bad)
    by_split.setdefault(split_of(f), []).append((f, qs))
  if not any(qs for parts in by_split.values() for _, qs in parts):
    raise DataError(f"{root}: no CMExam questions could be read")
  dtype = _token_dtype(tokenizer)

  def fill(tmp: Path) -> dict:
    t0 = time.perf_counter()
    splits = {}
    for split, parts in sorted(by_split.items()):
      qs = [q for _, part in parts for q in part]
      if not qs:
        continue
      docs = tokenize_sft(qs, tokenizer, seq_len, with_explanation)
      w = _RowWriter(tmp, split, dtype == np.uint32)
      _write_fit_rows(docs, seq_len, w)
      w.documents = int(docs.num_docs)
      splits[split] = w.close()
      lengths, n0 = np.diff(docs.offsets), 0
      for f, part in parts:  # per-file counts: the questions of a file are consecutive
        sources.setdefault(f.name, {})[split] = {
            "documents": len(part), "tokens": int(lengths[n0:n0 + len(part)].sum())}
        n0 += len(part)
    return _manifest("cmexam", "sft", tokenizer, seq_len, "fit", input_path, splits, sources,
                     {"with_explanation": with_explanation,
                      "build_seconds": round(time.perf_counter() - t0, 2)})

  final = _write_build(out_dir, "cmexam", fill)
  return final, tokenized.Build(final).manifest, problems


def _write_fit_rows(docs, seq_len: int, w: _RowWriter) -> None:
  """"fit" packing (`packing.pack`) of in-memory documents, one record per row."""
  pieces, row_ptr = pack(np.diff(docs.offsets), seq_len, "fit")
  for r in range(len(row_ptr) - 1):
    toks, wts, starts, n = [], [], [], 0
    for d, s, k in pieces[row_ptr[r]:row_ptr[r + 1]]:
      a = docs.offsets[d] + s
      if s == 0:
        starts.append(n)
      toks.append(docs.tokens[a:a + k])
      wts.append(docs.weights[a:a + k])
      n += k
    d, s, k = pieces[row_ptr[r + 1] - 1]
    if s + k < docs.offsets[d + 1] - docs.offsets[d]:  # continues: keep its next token
      a = docs.offsets[d] + s + k
      toks.append(docs.tokens[a:a + 1])
      wts.append(docs.weights[a:a + 1])
    w.write(np.concatenate(toks), n, np.asarray(starts, np.int64), np.concatenate(wts))
