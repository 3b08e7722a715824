"""grain input pipelines: packed continued pretraining (CPT), CMExam SFT, mixtures, eval passes.

Every batch is a dict of numpy arrays of shape [b, T] (b = this process's rows of the global
batch), the fields of `packing.FIELDS`.

Rows. A source is a random-access list of packed rows: `packing.PackedRows` over texts or
questions tokenized at start (the small-data path), or `tokenized.BuiltRows` read from a
tokenized build (`medjax data build --tokenizer`), one record per row, nothing loaded ahead.

One global order. All processes see the same sequence of rows: sample i is found by index
arithmetic alone (grain's index shuffle of the rows, reseeded each epoch, and grain's
deterministic mix for mixtures), whatever the number of processes. Global batch b is samples
[b*B, (b+1)*B); a process whose devices hold rows [start, stop) of the global batch reads
samples b*B + start ... b*B + stop - 1, by random access, and nothing else.

Mixtures are weighted by trained tokens: a source's share of rows is its weight divided by
its mean trained tokens per row, so `[(medical, 0.9), (general, 0.1)]` trains 10% of the
tokens (not of the rows) on general text. The iterator counts the trained tokens it hands
out per source (`take_source_tokens`), for the realized fractions in the training metrics.

Resuming. `it.get_state()` is a global position, {"global_batch", "global_sample",
"batch_size"}: `set_state` on an iterator built with the same data and seed continues with
the identical next global batch, on any number of processes and any mesh (each process
reads its own rows of it). With another global batch size it continues at the same sample.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from medjax.data import corpus
from medjax.data.packing import (FIELDS, PackedRows, TokenizedDocs, tokenize_documents,
                                 tokenize_sft)
from medjax.data.tokenizer import Tokenizer
from medjax.errors import DataError


def _is_rows(source) -> bool:
  """A random-access list of packed rows (PackedRows, BuiltRows)."""
  return hasattr(source, "trained_tokens") and hasattr(source, "__getitem__")


def _as_docs(source, tokenizer: Tokenizer) -> TokenizedDocs:
  """A CPT source: TokenizedDocs, a list of texts/Documents, or corpus path(s)."""
  if isinstance(source, TokenizedDocs):
    return source
  if isinstance(source, (str, os.PathLike)):
    source = corpus.read_texts(source)
  texts = [d.text if isinstance(d, corpus.Document) else d for d in source]
  if not texts:
    raise DataError("CPT source has no documents")
  return tokenize_documents(texts, tokenizer)


def _packed(docs: TokenizedDocs, seq_len: int, mode: str, pad_id: int, seed: int | None):
  """Rows of in-memory documents, packed in an order shuffled by `seed` (None: as given)."""
  order = None if seed is None else np.random.default_rng(seed).permutation(docs.num_docs)
  return PackedRows(docs, seq_len, mode, pad_id, order)


def _epochs(rows, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """The rows shuffled per epoch (grain's index shuffle: O(1) memory in the row count)."""
  if len(rows) == 0:
    raise DataError("source packs into no rows")
  return grain.MapDataset.source(rows).shuffle(seed).repeat(num_epochs)


class _Tag:
  """Adds the source index to each row of a mixture (counted, then dropped, by the
  iterator)."""

  def __init__(self, i: int):
    self.i = np.int32(i)

  def __call__(self, row):
    return {**row, "source": self.i}


def row_proportions(parts: Sequence[tuple[object, float]]) -> list[float]:
  """Row shares that give each source its weight in trained tokens.

  Args:
    parts: (rows, token weight) per source; rows have `len` and `trained_tokens`.

  Returns:
    Row proportions, summing to 1.
  """
  per_row = []
  for rows, _ in parts:
    if not rows.trained_tokens:
      raise DataError("a mixture source has no trained tokens")
    per_row.append(rows.trained_tokens / len(rows))
  p = [w / t for (_, w), t in zip(parts, per_row)]
  return [x / sum(p) for x in p]


class GlobalBatches:
  """This process's rows of each global batch, in the one global order (module docstring).

  Iterating yields [stop - start, T] batch dicts; grain threads read and assemble them ahead
  of the training step.
  """

  def __init__(self, ds: grain.MapDataset, batch_size: int, rows: slice, finite: bool,
               num_threads: int = 2, names: Sequence[str] = ()):
    start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
    if not 0 <= start < stop <= batch_size:
      raise DataError(f"rows {start}:{stop} are not within the global batch of {batch_size}")
    self._ds, self._B, self._start, self._per = ds, batch_size, start, stop - start
    self._num_batches = len(ds) // batch_size if finite else None
    self._threads = num_threads
    self._next, self._it = 0, None
    self.source_names = tuple(names)
    self._counts = np.zeros(len(names)) if names else None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_batches is not None and self._next >= self._num_batches:
      raise StopIteration
    if self._it is None:
      self._it = self._open(self._next)
    batch = next(self._it)
    self._next += 1
    src = batch.pop("source", None)
    if src is not None:
      tokens = batch["loss_mask"].sum(axis=1)
      np.add.at(self._counts, src, tokens)
    return batch

  def _open(self, first: int):
    local = _ProcessRows(self._ds, self._B, self._start, self._per, first, self._num_batches)
    ds = grain.MapDataset.source(local).batch(self._per, drop_remainder=True)
    opts = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=2 * self._threads)
    return iter(ds.to_iter_dataset(opts))

  def get_state(self) -> dict:
    return {"global_batch": self._next, "global_sample": self._next * self._B,
            "batch_size": self._B}

  def set_state(self, state: dict) -> None:
    """Continues at a saved global position (any process count; see module docstring).

    A state saved by an older medjax (grain's {"next_index": k}, k batches consumed)
    continues after k global batches of this order.
    """
    if "global_sample" in state:
      b = -(-int(state["global_sample"]) // self._B)  # never repeats a sample
    elif "next_index" in state:
      b = int(state["next_index"])
    else:
      raise DataError(f"data position {state!r}: not a medjax data iterator state")
    self._next, self._it = b, None

  def take_source_tokens(self) -> np.ndarray | None:
    """Trained tokens per mixture source handed out since the last call (None: no mixture)."""
    if self._counts is None:
      return None
    out, self._counts = self._counts, np.zeros_like(self._counts)
    return out


class _ProcessRows:
  """Local index j -> this process's j-th row: row `start + j % per` of global batch
  `first + j // per`."""

  def __init__(self, ds, batch_size, start, per, first, num_batches):
    self._ds, self._B, self._start, self._per, self._first = ds, batch_size, start, per, first
    self._len = sys.maxsize if num_batches is None else (num_batches - first) * per

  def __len__(self) -> int:
    return max(self._len, 0)

  def __getitem__(self, j: int):
    b, k = divmod(int(j), self._per)
    return self._ds[(self._first + b) * self._B + self._start + k]


def _process_rows(batch_size: int, process_index: int, process_count: int,
                  rows: slice | None) -> slice:
  """The rows of the global batch this process reads: `rows`, else an even split."""
  if rows is not None:
    return rows
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by "
                    f"process_count={process_count}")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _is_mixture(sources) -> bool:
  return (isinstance(sources, (list, tuple)) and len(sources) > 0
          and all(isinstance(s, tuple) and len(s) in (2, 3) and isinstance(s[1], (int, float))
                  for s in sources))


def make_iterator(sources, batch_size: int, seed: int = 0, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None,
                  num_threads: int = 2, rows: slice | None = None) -> GlobalBatches:
  """A resumable iterator over packed rows in the global order.

  Args:
    sources: rows (`PackedRows`, `tokenized.BuiltRows`) or a mixture
      `[(rows, token_weight[, name]), ...]` (weights need not sum to 1; repeated forever).
    batch_size: the global batch size B.
    seed: row shuffle (per epoch) and mixture sources' shuffles.
    process_index, process_count: an even split of each global batch over processes,
      used when `rows` is None.
    num_epochs: passes over the rows; None = forever. Must be None for a mixture.
    num_threads: grain threads assembling batches ahead of the training step.
    rows: the rows of each global batch this process reads (`distributed.process_slice`).

  Returns:
    A `GlobalBatches` iterator.
  """
  rows = _process_rows(batch_size, process_index, process_count, rows)
  if _is_mixture(sources):
    if num_epochs is not None:
      raise DataError("a mixture repeats its sources forever; use num_epochs=None")
    parts = [(s[0], float(s[1]), s[2] if len(s) > 2 else f"source{i}")
             for i, s in enumerate(sources)]
    if min(w for _, w, _ in parts) < 0 or sum(w for _, w, _ in parts) <= 0:
      raise DataError(f"mixture weights {[w for _, w, _ in parts]} must be >= 0, not all 0")
    parts = [p for p in parts if p[1] > 0]  # grain mixes only positive proportions
    props = row_proportions([(r, w) for r, w, _ in parts])
    ds = grain.MapDataset.mix([_epochs(r, seed + i, None).map(_Tag(i))
                               for i, (r, _, _) in enumerate(parts)], props)
    return GlobalBatches(ds, batch_size, rows, False, num_threads, [n for _, _, n in parts])
  ds = _epochs(sources, seed, num_epochs)
  return GlobalBatches(ds, batch_size, rows, num_epochs is not None, num_threads)


def make_cpt_iterator(sources, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      seed: int = 0, process_index: int = 0, process_count: int = 1,
                      num_epochs: int | None = None, packing: str = "concat",
                      num_threads: int = 2, rows: slice | None = None) -> GlobalBatches:
  """A resumable iterator of packed CPT batches.

  Args:
    sources: one source (texts, `corpus.Document`s, `TokenizedDocs`, corpus path(s), or
      packed rows such as `tokenized.BuiltRows`) or a mixture `[(source, weight[, name]),
      ...]`, e.g. `[(medical, 0.9), (general, 0.1)]` for 10% of the trained tokens from
      general text; each source is repeated forever.
    tokenizer: encodes texts (its `pad_id` pads rows).
    seq_len: T.
    batch_size: the global batch size; each process gets its rows of it.
    seed: document order, row shuffle and mixture sources.
    process_index, process_count: used when `rows` is None (an even split).
    num_epochs: passes over the data; None = forever. Must be None for a mixture.
    packing: "concat" or "fit" (`packing` module docstring), for texts.
    num_threads: grain threads assembling batches ahead of the training step.
    rows: the rows of each global batch this process reads.

  Returns:
    A `GlobalBatches` iterator with get_state/set_state.
  """
  def as_rows(source, s):
    if _is_rows(source):
      return source
    return _packed(_as_docs(source, tokenizer), seq_len, packing, tokenizer.pad_id, s)

  if _is_mixture(sources):
    sources = [(as_rows(x[0], seed + i), *x[1:]) for i, x in enumerate(sources)]
  else:
    sources = as_rows(sources, seed)
  return make_iterator(sources, batch_size, seed, process_index, process_count, num_epochs,
                       num_threads, rows)


def make_sft_iterator(questions, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      seed: int = 0, with_explanation: bool = False, pack: bool = True,
                      process_index: int = 0, process_count: int = 1,
                      num_epochs: int | None = None, num_threads: int = 2,
                      rows: slice | None = None) -> GlobalBatches:
  """A resumable iterator of CMExam SFT batches (prompt masked, response + EOS trained).

  Args:
    questions: CMExam questions (`cmexam.read_cmexam`), or the rows of a tokenized
      `cmexam` build.
    tokenizer: encodes prompt and response.
    seq_len: T; longer examples are truncated (see `tokenize_sft`).
    batch_size: the global batch size (split across processes).
    seed: example order and row shuffle.
    with_explanation: train on "letters\\n解析：explanation" instead of the letters only.
    pack: several examples per row ("fit" packing, never splitting an example); False puts
      one example per row.
    process_index, process_count: used when `rows` is None (an even split).
    num_epochs: passes over the questions; None = forever.
    num_threads: grain threads.
    rows: the rows of each global batch this process reads.

  Returns:
    A `GlobalBatches` iterator with get_state/set_state.
  """
  if not _is_rows(questions):
    if not questions:
      raise DataError("no SFT questions")
    docs = tokenize_sft(questions, tokenizer, seq_len, with_explanation)
    questions = _packed(docs, seq_len, "fit" if pack else "single", tokenizer.pad_id, seed)
  return make_iterator(questions, batch_size, seed, process_index, process_count, num_epochs,
                       num_threads, rows)


def eval_batches(source, tokenizer: Tokenizer, seq_len: int, batch_size: int, *,
                 kind: str = "cpt", with_explanation: bool = False, process_index: int = 0,
                 process_count: int = 1,
                 rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
  """A finite, unshuffled, deterministic pass for validation loss.

  Every process yields the same number of batches; the last ones are padded with empty rows
  (loss_mask 0, segment_ids 0), so summing loss * mask over batches counts each token once.

  Args:
    source: packed rows (e.g. a build's validation split), or for kind="cpt" a CPT source
      (texts, Documents, TokenizedDocs, path); for kind="sft" a list of `cmexam.Question`.
    tokenizer: encodes the data.
    seq_len: T.
    batch_size: the global batch size.
    kind: "cpt" (concat packing) or "sft" (fit packing, prompt masked).
    with_explanation: for "sft", as in `make_sft_iterator`.
    process_index, process_count: an even split of each batch, used when `rows` is None.
    rows: the rows of each global batch this process reads.

  Yields:
    Batch dicts of this process's rows of each global batch.
  """
  if kind not in ("cpt", "sft"):
    raise DataError(f"eval kind {kind!r}: use 'cpt' or 'sft'")
  sl = _process_rows(batch_size, process_index, process_count, rows)
  if _is_rows(source):
    packed = source
  elif kind == "cpt":
    packed = _packed(_as_docs(source, tokenizer), seq_len, "concat", tokenizer.pad_id, None)
  else:
    docs = tokenize_sft(source, tokenizer, seq_len, with_explanation)
    packed = _packed(docs, seq_len, "fit", tokenizer.pad_id, None)
  n_batches = -(-len(packed) // batch_size)  # ceil over the global batch
  blank = None
  for b in range(n_batches):
    items = []
    for i in range(b * batch_size + sl.start, b * batch_size + sl.stop):
      if i < len(packed):
        items.append(packed[i])
        continue
      if blank is None:
        blank = {k: np.zeros_like(v) for k, v in packed[0].items()}
        blank["inputs"][:] = tokenizer.pad_id
        blank["targets"][:] = tokenizer.pad_id
      items.append(blank)
    yield {k: np.stack([it[k] for it in items]) for k in FIELDS}

