"""Tokenized documents and their packing into fixed-length rows.

A row is a dict of numpy arrays, each of shape [T]:

  inputs       int32    token ids (`pad_id` in padding)
  targets      int32    the next token of the same document (anything where loss_mask is 0)
  loss_mask    float32  1 where the target counts
  segment_ids  int32    1, 2, 3, ... per document packed in the row; 0 = padding
  positions    int32    restart at 0 for each segment

Documents are tokenized once (BOS + text + EOS, the tokenizer's batch encoder) and laid out
into rows of `seq_len` tokens:
  - "concat" (CPT default): documents follow each other with no padding; a document that
    does not fit in the rest of a row (including any document longer than a row) is split,
    and its next chunk starts the following row as a new segment with positions from 0.
  - "fit" (SFT default): a document that does not fit in the rest of the row starts a new
    row (the rest is padding); only documents longer than a row are split into chunks.
  Either way every token appears as an input exactly once per epoch. The target of a chunk's
  last token is the document's next token (the first of its next chunk), so no target is lost
  either; the target after EOS (a different document) is masked.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from medjax.data import cmexam
from medjax.data.tokenizer import Tokenizer
from medjax.errors import DataError

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


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


def encode_sft_example(prompt_ids: list[int], response_ids: list[int], seq_len: int,
                       keep: int = 1):
  """Joins one SFT example, truncating the prompt from the left when it does not fit.

  Args:
    prompt_ids: BOS + prompt tokens (prompt tokens alone for a tokenizer without BOS).
    response_ids: response tokens + EOS.
    seq_len: the row length.
    keep: leading prompt tokens never cut: 1 for the BOS, 0 without one (Qwen).

  Returns:
    (ids, weights): weights[i] = 1 where the target of token i is a response token.
  """
  room = seq_len - len(response_ids)
  if room < 2:
    raise DataError(f"seq_len={seq_len} cannot hold a {len(response_ids)}-token answer")
  if len(prompt_ids) > room:
    # Keep BOS and the end of the prompt: the options and the answer cue are at the end.
    prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - room + keep:]
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
  keep = int(tokenizer.bos_id is not None)
  for p, r, s in zip(prompts, full, short):
    if len(p) + len(r) > seq_len and r is not s:
      r, dropped = s, dropped + 1
    cut += len(p) + len(r) > seq_len
    i, w = encode_sft_example(p, r, seq_len, keep)
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

  @property
  def trained_tokens(self) -> int:
    """Targets with loss_mask 1 over all rows (mixtures weigh sources by it)."""
    starts, ends = self.docs.offsets[self.order], self.docs.offsets[self.order + 1]
    if self.docs.weights is None:  # every target inside a document
      return int(np.maximum(ends - starts - 1, 0).sum())
    cum = np.concatenate([[0], np.cumsum(self.docs.weights, dtype=np.int64)])
    last = np.maximum(ends - 1, starts)  # the last token's target is another document
    return int((cum[last] - cum[starts]).sum())

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
