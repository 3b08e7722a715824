"""SentencePiece tokenizer wrapper (Llama 2 `tokenizer.model`).

`Tokenizer.encode` gives the same ids as Hugging Face's `LlamaTokenizer` on the same model
file (tests/test_tokenizer.py checks it). Llama 2 has no padding piece, so `pad_id` is 0
(`<unk>`): padded positions always carry `loss_mask == 0` and `segment_ids == 0`, so the id
placed there never matters. Vocabulary extension is `data.extend`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from medjax.errors import DataError


class Tokenizer:
  """A SentencePiece model with Llama's special-token conventions."""

  def __init__(self, path: str | os.PathLike):
    self._path = Path(path)
    if not self._path.is_file():
      raise DataError(f"{self._path}: tokenizer model not found")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(self._path))
    except (RuntimeError, OSError) as e:
      raise DataError(f"{self._path}: not a SentencePiece model ({e})") from None
    if self._sp.vocab_size() == 0:
      raise DataError(f"{self._path}: SentencePiece model has no pieces")
    # Ids never emitted by decode(): control pieces and our pad stand-in.
    self._skip = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}

  @property
  def path(self) -> Path:
    return self._path

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    """The underlying processor, for callers that need its full API."""
    return self._sp

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def pad_id(self) -> int:
    # Llama's model sets pad_id=-1 (no piece); 0 is a valid id that is masked everywhere.
    pad = self._sp.pad_id()
    return pad if pad >= 0 else 0

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Encodes one string.

    Args:
      text: the text; SentencePiece adds its dummy-prefix space as Llama does.
      bos: prepend `bos_id`.
      eos: append `eos_id`.

    Returns:
      Token ids.
    """
    ids = self._sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                   num_threads: int = -1) -> list[list[int]]:
    """Encodes many strings in SentencePiece's C++ thread pool (much faster than a loop).

    Args:
      texts: the strings.
      bos: prepend `bos_id` to each.
      eos: append `eos_id` to each.
      num_threads: SentencePiece threads; -1 uses all cores.

    Returns:
      One id list per string.
    """
    return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to text, skipping bos/eos/pad (like HF's `skip_special_tokens=True`)."""
    return self._sp.decode([int(i) for i in ids if int(i) not in self._skip])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __repr__(self) -> str:
    return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"
