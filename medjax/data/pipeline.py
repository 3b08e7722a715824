"""grain input pipelines: packed continued pretraining (CPT), CMExam SFT, mixtures, eval passes.

Every batch is a dict of numpy arrays of shape [B, T] (B = per-process batch size), the
fields of `packing.FIELDS`.

Order and sharding. Documents are shuffled once with `seed` before packing; rows are then
shuffled with `seed` per epoch (grain reseeds each epoch), split across processes by
`rows[process_index::process_count]`, and batched; with finite `num_epochs` the pass stops
after the last complete global batch, so every process takes the same number of steps. A
mixture draws whole rows from each source in proportion to its weight (deterministically).

Resuming. The iterators are grain `DatasetIterator`s: `it.get_state()` is a small
JSON-serialisable dict, and `it.set_state(state)` on a freshly built iterator (same arguments)
continues with the identical next batch. Build them with the same `seed`, data and
`process_count`, or the state means something else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from medjax.data import cmexam, corpus
from medjax.data.packing import (FIELDS, PackedRows, TokenizedDocs, tokenize_documents,
                                 tokenize_sft)
from medjax.data.tokenizer import Tokenizer
from medjax.errors import DataError


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


def _rows(docs: TokenizedDocs, seq_len: int, mode: str, pad_id: int, seed: int,
          shuffle: bool) -> grain.MapDataset:
  order = None
  if shuffle:
    order = np.random.default_rng(seed).permutation(docs.num_docs)
  rows = PackedRows(docs, seq_len, mode, pad_id, order)
  if len(rows) == 0:
    raise DataError("source packs into no rows")
  ds = grain.MapDataset.source(rows)
  return ds.shuffle(seed) if shuffle else ds


def _finish(ds: grain.MapDataset, batch_size: int, process_index: int, process_count: int,
            num_threads: int, finite: bool):
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by "
                    f"process_count={process_count}")
  num_batches = len(ds) // batch_size  # global batches, counted before sharding
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if finite:
    # Every process must take the same number of steps (collectives would hang otherwise),
    # so all stop after the last complete global batch.
    ds = ds[:num_batches]
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(opts))


def _is_mixture(sources) -> bool:
  return (isinstance(sources, (list, tuple)) and len(sources) > 0
          and all(isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], (int, float))
                  for s in sources))


def make_cpt_iterator(sources, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      seed: int = 0, process_index: int = 0, process_count: int = 1,
                      num_epochs: int | None = None, packing: str = "concat",
                      num_threads: int = 2):
  """A resumable iterator of packed CPT batches.

  Args:
    sources: one source (texts, `corpus.Document`s, `TokenizedDocs`, or corpus path(s)) or
      a mixture `[(source, weight), ...]`, e.g. `[(medical, 0.9), (general, 0.1)]` for a
      10% general-text replay; weights are normalised, each source is repeated forever.
    tokenizer: encodes the texts.
    seq_len: T.
    batch_size: the global batch size; each process gets batch_size // process_count rows.
    seed: document order, row shuffle and mixture interleaving.
    process_index: this process (jax.process_index()).
    process_count: jax.process_count().
    num_epochs: passes over the data; None = forever. Must be None for a mixture.
    packing: "concat" or "fit" (module docstring).
    num_threads: grain threads assembling batches ahead of the training step.

  Returns:
    A grain DatasetIterator of batch dicts (module docstring) with get_state/set_state.
  """
  pad = tokenizer.pad_id
  if _is_mixture(sources):
    if num_epochs is not None:
      raise DataError("a mixture repeats its sources forever; use num_epochs=None")
    weights = [float(w) for _, w in sources]
    if min(weights) < 0 or sum(weights) <= 0:
      raise DataError(f"mixture weights {weights} must be >= 0 and not all 0")
    parts = [_rows(_as_docs(s, tokenizer), seq_len, packing, pad, seed + i, True).repeat()
             for i, (s, _) in enumerate(sources)]
    ds = grain.MapDataset.mix(parts, weights)
  else:
    ds = _rows(_as_docs(sources, tokenizer), seq_len, packing, pad, seed, True)
    ds = ds.repeat(num_epochs)
  return _finish(ds, batch_size, process_index, process_count, num_threads,
                 num_epochs is not None)


def make_sft_iterator(questions: Sequence[cmexam.Question], tokenizer: Tokenizer,
                      seq_len: int, batch_size: int, seed: int = 0,
                      with_explanation: bool = False, pack: bool = True,
                      process_index: int = 0, process_count: int = 1,
                      num_epochs: int | None = None, num_threads: int = 2):
  """A resumable iterator of CMExam SFT batches (prompt masked, response + EOS trained).

  Args:
    questions: CMExam questions (`cmexam.read_cmexam`).
    tokenizer: encodes prompt and response.
    seq_len: T; longer examples are truncated (see `tokenize_sft`).
    batch_size: the global batch size (split across processes).
    seed: example order and row shuffle.
    with_explanation: train on "letters\\n解析：explanation" instead of the letters only.
    pack: several examples per row ("fit" packing, never splitting an example); False puts
      one example per row.
    process_index, process_count: this process and the number of processes.
    num_epochs: passes over the questions; None = forever.
    num_threads: grain threads.

  Returns:
    A grain DatasetIterator of batch dicts with get_state/set_state.
  """
  if not questions:
    raise DataError("no SFT questions")
  docs = tokenize_sft(questions, tokenizer, seq_len, with_explanation)
  ds = _rows(docs, seq_len, "fit" if pack else "single", tokenizer.pad_id, seed, True)
  return _finish(ds.repeat(num_epochs), batch_size, process_index, process_count, num_threads,
                 num_epochs is not None)


def eval_batches(source, tokenizer: Tokenizer, seq_len: int, batch_size: int, *,
                 kind: str = "cpt", with_explanation: bool = False, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """A finite, unshuffled, deterministic pass for validation loss.

  Every process yields the same number of batches; the last ones are padded with empty rows
  (loss_mask 0, segment_ids 0), so summing loss * mask over batches counts each token once.

  Args:
    source: for kind="cpt" a CPT source (texts, Documents, TokenizedDocs, path); for
      kind="sft" a list of `cmexam.Question`.
    tokenizer: encodes the data.
    seq_len: T.
    batch_size: the global batch size (split across processes).
    kind: "cpt" (concat packing) or "sft" (fit packing, prompt masked).
    with_explanation: for "sft", as in `make_sft_iterator`.
    process_index, process_count: this process and the number of processes.

  Yields:
    Batch dicts of [batch_size // process_count, seq_len] arrays.
  """
  if kind == "cpt":
    rows = PackedRows(_as_docs(source, tokenizer), seq_len, "concat", tokenizer.pad_id)
  elif kind == "sft":
    docs = tokenize_sft(source, tokenizer, seq_len, with_explanation)
    rows = PackedRows(docs, seq_len, "fit", tokenizer.pad_id)
  else:
    raise DataError(f"eval kind {kind!r}: use 'cpt' or 'sft'")
  per = batch_size // process_count
  n_batches = -(-len(rows) // batch_size)  # ceil over the global batch
  blank = {k: np.zeros_like(v) for k, v in rows[0].items()} if len(rows) else None
  if blank is not None:
    blank["inputs"][:] = tokenizer.pad_id
    blank["targets"][:] = tokenizer.pad_id
  for b in range(n_batches):
    idx = [b * batch_size + process_index + j * process_count for j in range(per)]
    items = [rows[i] if i < len(rows) else blank for i in idx]
    yield {k: np.stack([it[k] for it in items]) for k in FIELDS}
