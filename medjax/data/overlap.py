"""Eval-set contamination: eval items that share a character n-gram with the training corpus
(whitespace ignored; 13 characters by default, as GPT-3's check used 13-grams).

Only the eval set is indexed (its n-grams, hashed); the corpus is streamed once in blocks,
so memory is bounded by the eval set and one block, whatever the corpus size. Each block's
n-grams are hashed with numpy (a polynomial hash over code points, modulo 2**64) and looked
up among the eval hashes; every hash hit is then checked exactly, so a collision never
counts. A tokenized build (`build_overlap`) is decoded back to text document by document, so
its check means the same as on the raw files (token n-grams would not: with byte fallback a
Chinese character is 1 to 3 Llama tokens).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from medjax.data.corpus import Document

_P = np.uint64(1_000_003)  # hash multiplier
BLOCK = 1 << 20  # characters hashed at once


@dataclasses.dataclass
class Overlap:
  """Eval-set contamination by shared n-grams."""

  n: int
  hits: dict[int, int]  # eval index -> number of its n-grams found in the corpus
  grams: dict[int, int]  # eval index -> number of its distinct n-grams
  example: dict[int, tuple[str, str]]  # eval index -> (a shared n-gram, where in the corpus)
  dirty_docs: set[int]  # corpus documents (by position in the stream) sharing an n-gram
  scanned: int = 0  # corpus characters read
  tokens: int = 0  # token ids read (a build)
  seconds: float = 0.0


def _hashes(v: np.ndarray, n: int) -> np.ndarray:
  """[len(v) - n + 1] uint64 hashes of v's n-grams."""
  m = len(v) - n + 1
  if m <= 0:
    return np.zeros(0, np.uint64)
  v = v.astype(np.uint64)
  h = np.zeros(m, np.uint64)
  with np.errstate(over="ignore"):
    for j in range(n):
      h = h * _P + v[j:j + m]
  return h


class _Index:
  """The eval set's n-grams: sorted hashes, and the exact n-grams behind them."""

  def __init__(self, items: Sequence[np.ndarray], n: int):
    self.n = n
    self.owners: dict[bytes, list[int]] = {}
    self.grams: dict[int, int] = {}
    hs = [np.zeros(0, np.uint64)]
    for i, v in enumerate(items):
      keys = {v[k:k + n].tobytes() for k in range(len(v) - n + 1)}
      self.grams[i] = len(keys)
      for key in keys:
        self.owners.setdefault(key, []).append(i)
      hs.append(_hashes(v, n))
    self.hashes = np.unique(np.concatenate(hs))

  def find(self, v: np.ndarray):
    """(position, eval indices) of v's n-grams found in the eval set, exactly."""
    h = _hashes(v, self.n)
    if not len(self.hashes):
      return
    at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
    pos = np.flatnonzero(self.hashes[at] == h)
    for p in pos.tolist():
      owners = self.owners.get(v[p:p + self.n].tobytes())
      if owners:
        yield p, owners


def _codes(text: str) -> np.ndarray:
  """Unicode code points of a text without whitespace."""
  return np.frombuffer("".join(text.split()).encode("utf-32-le"), np.uint32)


def ngram_overlap(eval_texts: Sequence[str], docs: Iterable[Document], n: int = 13,
                  on_doc: Callable[[int, Document, bool], None] | None = None) -> Overlap:
  """Finds eval texts that share an `n`-character substring (whitespace ignored) with corpus
  documents, streaming the documents once.

  Args:
    eval_texts: e.g. question + options of each eval item.
    docs: the training corpus, any iterable (e.g. `corpus.iter_documents`).
    n: n-gram length in characters.
    on_doc: called as on_doc(index, document, shares_an_ngram) for each document, in order
      (e.g. to write the clean ones).

  Returns:
    An `Overlap`.
  """
  index = _Index([_codes(t) for t in eval_texts], n)
  found: dict[int, set[bytes]] = {}
  example: dict[int, tuple[str, str]] = {}
  dirty: set[int] = set()
  t0, scanned = time.perf_counter(), 0

  def scan(block: list[tuple[int, Document, np.ndarray]]):
    # Documents are joined with a 0 code point, which no eval n-gram contains.
    v = np.concatenate([x for _, _, c in block for x in (c, np.zeros(1, np.uint32))])
    starts = np.cumsum([0] + [len(c) + 1 for _, _, c in block])
    for p, owners in index.find(v):
      k = int(np.searchsorted(starts, p, side="right")) - 1
      j, d, _ = block[k]
      dirty.add(j)
      gram = v[p:p + n]
      for i in owners:
        found.setdefault(i, set()).add(gram.tobytes())
        example.setdefault(i, (gram.tobytes().decode("utf-32-le"), d.source))
    if on_doc is not None:
      for j, d, _ in block:
        on_doc(j, d, j in dirty)

  block, size = [], 0
  for j, d in enumerate(docs):
    c = _codes(d.text)
    scanned += len(d.text)
    block.append((j, d, c))
    size += len(c) + 1
    if size >= BLOCK:
      scan(block)
      block, size = [], 0
  if block:
    scan(block)
  return Overlap(n, {i: len(s) for i, s in found.items()}, index.grams, example, dirty,
                 scanned=scanned, seconds=time.perf_counter() - t0)


def build_overlap(eval_texts: Sequence[str], documents: Iterable[tuple[np.ndarray, str]],
                  decode: Callable[[list[int]], str], n: int = 13) -> Overlap:
  """`ngram_overlap` on a tokenized build: each document's ids are decoded back to text, so
  the check means the same as on the raw files (n characters, whitespace ignored).

  Args:
    eval_texts: e.g. question + options of each eval item.
    documents: (token ids, where) of each document (`tokenized.Build.iter_documents`).
    decode: the build's tokenizer's decode (ids -> text).
    n: n-gram length in characters.

  Returns:
    An `Overlap`; `tokens` counts the ids read.
  """
  tokens = 0

  def docs():
    nonlocal tokens
    for ids, where in documents:
      tokens += len(ids)
      yield Document(decode(ids.tolist()), where)

  ov = ngram_overlap(eval_texts, docs(), n)
  ov.tokens = tokens
  return ov
