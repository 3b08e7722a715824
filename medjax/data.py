"""grain input pipelines: packed continued pretraining (CPT), CMExam SFT, mixtures, eval passes.

Every batch is a dict of numpy arrays, all of shape [B, T] (B = per-process batch size):

  inputs       int32    token ids (`pad_id` in padding)
  targets      int32    the next token of the same document (anything where loss_mask is 0)
  loss_mask    float32  1 where the target counts
  segment_ids  int32    1, 2, 3, ... per document packed in the row; 0 = padding
  positions    int32    restart at 0 for each segment

Packing. Documents are tokenized once (BOS + text + EOS, SentencePiece's batch encoder) and
laid out into rows of `seq_len` tokens:
  - "concat" (CPT default): documents follow each other with no padding; a document that
    does not fit in the rest of a row (including any document longer than a row) is split,
    and its next chunk starts the following row as a new segment with positions from 0.
  - "fit" (SFT default): a document that does not fit in the rest of the row starts a new
    row (the rest is padding); only documents longer than a row are split into chunks.
  Either way every token appears as an input exactly once per epoch. The target of a chunk's
  last token is the document's next token (the first of its next chunk), so no target is lost
  either; the target after EOS (a different document) is masked.

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

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from medjax import cmexam, corpus
from medjax.errors import DataError
from medjax.tokenizer import Tokenizer

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
ASSETS = Path(__file__).parent / "assets"


def asset_path(name: str) -> Path:
  """The path of a shipped sample under medjax/assets/ (e.g. "cmexam_sample.csv")."""
  p = ASSETS / name
  if not p.exists():
    raise DataError(f"{p}: asset not found (shipped assets: "
                    f"{', '.join(sorted(x.name for x in ASSETS.iterdir()))})")
  return p


@dataclasses.dataclass(frozen=True)
class TokenizedDocs:
  """Documents as one flat token array.

  Attributes:
    tokens: [N] int32, every document's ids back to back.
    offsets: [D+1] int64; document d is tokens[offsets[d]:offsets[d+1]].
    weights: [N] uint8 or None; weights[i] = 1 if the target of token i (token i+1 of the
      same document) is trained. None means every target within the document counts (CPT).
  """

  tokens: np.ndarray
  offsets: np.ndarray
  weights: np.ndarray | None = None

  @property
  def num_docs(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  def doc(self, d: int) -> np.ndarray:
    return self.tokens[self.offsets[d]: self.offsets[d + 1]]

  @staticmethod
  def from_lists(ids: Sequence[Sequence[int]], weights: Sequence[Sequence[int]] | None = None):
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), np.int32, int(offsets[-1]))
    w = None
    if weights is not None:
      w = np.fromiter((t for x in weights for t in x), np.uint8, int(offsets[-1]))
    return TokenizedDocs(flat, offsets, w)


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> TokenizedDocs:
  """Tokenizes documents once as BOS + text + EOS (SentencePiece's threaded batch encode)."""
  return TokenizedDocs.from_lists(tokenizer.encode_batch(texts, bos=True, eos=True))


def encode_sft_example(prompt_ids: list[int], response_ids: list[int], seq_len: int):
  """Joins one SFT example, truncating the prompt from the left when it does not fit.

  Args:
    prompt_ids: BOS + prompt tokens.
    response_ids: response tokens + EOS.
    seq_len: the row length.

  Returns:
    (ids, weights): weights[i] = 1 where the target of token i is a response token.
  """
  room = seq_len - len(response_ids)
  if room < 2:
    raise DataError(f"seq_len={seq_len} cannot hold a {len(response_ids)}-token answer")
  if len(prompt_ids) > room:
    # Keep BOS and the end of the prompt: the options and the answer cue are at the end.
    prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1:]
  ids = prompt_ids + response_ids
  n = len(prompt_ids)
  weights = [0] * (n - 1) + [1] * len(response_ids) + [0]
  return ids, weights


def tokenize_sft(questions: Sequence[cmexam.Question], tokenizer: Tokenizer, seq_len: int,
                 with_explanation: bool = False) -> TokenizedDocs:
  """Tokenizes CMExam questions as prompt (loss 0) + response + EOS (loss 1).

  Truncation, only for examples longer than `seq_len`: first the explanation is dropped
  (the response becomes just the letters), then the prompt is cut from the left, keeping
  BOS and its end (options and "答案："). The answer is never dropped.
  """
  prompts = tokenizer.encode_batch([cmexam.format_prompt(q) for q in questions], bos=True)
  full = tokenizer.encode_batch(
      [cmexam.format_response(q, with_explanation) for q in questions], bos=False, eos=True)
  short = full
  if with_explanation:
    short = tokenizer.encode_batch([cmexam.format_response(q) for q in questions], bos=False,
                                   eos=True)
  ids, weights, dropped, cut = [], [], 0, 0
  for p, r, s in zip(prompts, full, short):
    if len(p) + len(r) > seq_len and r is not s:
      r, dropped = s, dropped + 1
    cut += len(p) + len(r) > seq_len
    i, w = encode_sft_example(p, r, seq_len)
    ids.append(i)
    weights.append(w)
  if dropped or cut:
    logging.info("SFT: %d explanations dropped, %d prompts cut from the left (seq_len=%d)",
                 dropped, cut, seq_len)
  return TokenizedDocs.from_lists(ids, weights)


def pack(lengths: np.ndarray, seq_len: int, mode: str = "concat"):
  """Assigns document chunks to rows.

  Args:
    lengths: [D] document lengths in tokens, in packing order.
    seq_len: row length T.
    mode: "concat", "fit" (see module docstring) or "single" (one document per row).

  Returns:
    (pieces, row_ptr): pieces [P, 3] int64 of (doc, start, length) in row order; the
    pieces of row r are pieces[row_ptr[r]:row_ptr[r+1]].
  """
  if mode not in ("concat", "fit", "single"):
    raise DataError(f"packing mode {mode!r}: use 'concat', 'fit' or 'single'")
  pieces, row_ptr, used = [], [0], 0
  for d, n in enumerate(lengths.tolist()):
    if used and (mode == "single" or (mode == "fit" and n > seq_len - used)):
      row_ptr.append(len(pieces))  # start a new row; the rest of this one is padding
      used = 0
    start = 0
    while start < n:
      take = min(n - start, seq_len - used)
      pieces.append((d, start, take))
      start += take
      used += take
      if used == seq_len:
        row_ptr.append(len(pieces))
        used = 0
  if used:
    row_ptr.append(len(pieces))
  return np.asarray(pieces, np.int64).reshape(-1, 3), np.asarray(row_ptr, np.int64)


class PackedRows:
  """Random access to packed rows (a grain-compatible source: `len` and `__getitem__`)."""

  def __init__(self, docs: TokenizedDocs, seq_len: int, mode: str, pad_id: int,
               order: np.ndarray | None = None):
    self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
    self.order = np.arange(docs.num_docs) if order is None else order
    lengths = np.diff(docs.offsets)[self.order]
    self.pieces, self.row_ptr = pack(lengths, seq_len, mode)

  def __len__(self) -> int:
    return len(self.row_ptr) - 1

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    T, docs = self.seq_len, self.docs
    row = {"inputs": np.full(T, self.pad_id, np.int32),
           "targets": np.full(T, self.pad_id, np.int32),
           "loss_mask": np.zeros(T, np.float32),
           "segment_ids": np.zeros(T, np.int32),
           "positions": np.zeros(T, np.int32)}
    o = 0
    for seg, (d, s, n) in enumerate(self.pieces[self.row_ptr[r]: self.row_ptr[r + 1]], 1):
      a, end = docs.offsets[self.order[d]] + s, docs.offsets[self.order[d] + 1]
      nt = min(n, end - a - 1)  # tokens whose next token is in the same document
      row["inputs"][o:o + n] = docs.tokens[a:a + n]
      row["targets"][o:o + nt] = docs.tokens[a + 1:a + 1 + nt]
      row["loss_mask"][o:o + nt] = 1.0 if docs.weights is None else docs.weights[a:a + nt]
      row["segment_ids"][o:o + n] = seg
      row["positions"][o:o + n] = np.arange(n)
      o += n
    return row


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


def bench_data(source, tokenizer: Tokenizer, seq_len: int = 2048, batch_size: int = 8,
               num_batches: int = 200, num_threads: int = 2) -> dict:
  """Measures CPT pipeline throughput: one tokenization pass, then packed batches.

  Args:
    source: a CPT source (e.g. a corpus path).
    tokenizer: the tokenizer.
    seq_len, batch_size: batch shape.
    num_batches: batches to time (the source repeats as needed).
    num_threads: grain threads.

  Returns:
    {"tokenize_tokens_per_s", "pipeline_tokens_per_s", "num_tokens", ...}.
  """
  texts = corpus.read_texts(source) if isinstance(source, (str, os.PathLike)) else source
  t0 = time.perf_counter()
  docs = tokenize_documents(texts, tokenizer)
  t1 = time.perf_counter()
  it = make_cpt_iterator(docs, tokenizer, seq_len, batch_size, seed=0,
                         num_threads=num_threads)
  next(it)  # exclude thread start-up
  t2 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  t3 = time.perf_counter()
  return {"num_docs": docs.num_docs, "num_tokens": docs.num_tokens,
          "tokenize_s": round(t1 - t0, 3),
          "tokenize_tokens_per_s": round(docs.num_tokens / (t1 - t0)),
          "pipeline_tokens_per_s": round(num_batches * batch_size * seq_len / (t3 - t2)),
          "end_to_end_tokens_per_s": round(
              num_batches * batch_size * seq_len / (t3 - t2 + t1 - t0)),
          "seq_len": seq_len, "batch_size": batch_size, "num_batches": num_batches}


def render_row(batch: dict[str, np.ndarray], tokenizer: Tokenizer, row: int = 0) -> str:
  """Shows one row as text: each segment on its own line, untrained tokens in ⟦ ⟧.

  A token counts as trained when it is the target of a position with loss_mask 1, i.e.
  token i is trained iff loss_mask[i - 1] == 1 within its segment.
  """
  seg, ids, mask = batch["segment_ids"][row], batch["inputs"][row], batch["loss_mask"][row]
  out = []
  for s in sorted(set(seg.tolist()) - {0}):
    pos = np.flatnonzero(seg == s)
    trained = [False] + [bool(mask[p - 1]) for p in pos[1:]]
    groups, cur, flag = [], [], trained[0]
    for p, t in zip(pos, trained):
      if t != flag and cur:
        groups.append((flag, cur))
        cur = []
      flag = t
      cur.append(int(ids[p]))
    groups.append((flag, cur))
    text = "".join(_show(tokenizer, g) if t else f"⟦{_show(tokenizer, g)}⟧" for t, g in groups)
    out.append(f"[segment {s}, {len(pos)} tokens] {text}")
  pad = int((seg == 0).sum())
  if pad:
    out.append(f"[padding: {pad} tokens]")
  return "\n".join(out)


def _show(tokenizer: Tokenizer, ids: list[int]) -> str:
  # Make special tokens visible instead of silently skipping them as decode() does.
  parts, buf = [], []
  for i in ids:
    if i in (tokenizer.bos_id, tokenizer.eos_id):
      parts.append(tokenizer.decode(buf))
      parts.append("<s>" if i == tokenizer.bos_id else "</s>")
      buf = []
    else:
      buf.append(i)
  parts.append(tokenizer.decode(buf))
  return "".join(parts)
