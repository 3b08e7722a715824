"""Eval-set contamination: eval items that share a character n-gram with the training corpus."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from medjax.data.corpus import Document


@dataclasses.dataclass
class Overlap:
  """Eval-set contamination by shared character n-grams (whitespace ignored)."""

  n: int
  hits: dict[int, int]  # eval index -> number of its n-grams found in the corpus
  grams: dict[int, int]  # eval index -> number of its distinct n-grams
  example: dict[int, tuple[str, str]]  # eval index -> (a shared n-gram, corpus source)
  dirty_docs: set[int]  # corpus indices sharing any n-gram with the eval set


def _grams(text: str, n: int) -> set[str]:
  s = "".join(text.split())
  return {s[i:i + n] for i in range(len(s) - n + 1)}


def ngram_overlap(eval_texts: Sequence[str], docs: Sequence[Document], n: int = 13) -> Overlap:
  """Finds eval texts that share an `n`-character substring with corpus documents.

  Args:
    eval_texts: e.g. question + options of each eval item.
    docs: the training corpus.
    n: n-gram length in characters (13, as in GPT-3's contamination check).

  Returns:
    An `Overlap`. Only the (small) eval set is indexed; the corpus is streamed once.
  """
  index: dict[str, list[int]] = {}
  grams = {}
  for i, t in enumerate(eval_texts):
    g = _grams(t, n)
    grams[i] = len(g)
    for x in g:
      index.setdefault(x, []).append(i)
  found: dict[int, set[str]] = {}
  example: dict[int, tuple[str, str]] = {}
  dirty = set()
  for j, d in enumerate(docs):
    for x in _grams(d.text, n) & index.keys():
      dirty.add(j)
      for i in index[x]:
        found.setdefault(i, set()).add(x)
        example.setdefault(i, (x, d.source))
  return Overlap(n, {i: len(s) for i, s in found.items()}, grams, example, dirty)
