"""Tokenizers: SentencePiece (Llama 2's `tokenizer.model`) here, HF `tokenizer.json`
(Qwen2.5, Llama 3) in `data.hf_tokenizer`, one interface: encode/encode_batch/decode,
bos_id/eos_id/pad_id/vocab_size, path, fingerprint. `load_tokenizer` picks the kind from a
file or a model directory; `copy_tokenizer` moves one with its side files.

`Tokenizer.encode` gives the same ids as Hugging Face's `LlamaTokenizer` on the same model
file (tests/test_tokenizer.py checks it). Llama 2 has no padding piece, so `pad_id` is 0
(`<unk>`): padded positions always carry `loss_mask == 0` and `segment_ids == 0`, so the id
placed there never matters. Vocabulary extension is `data.extend`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from medjax.errors import DataError

SP_FILE = "tokenizer.model"  # SentencePiece (Llama 2)
HF_FILE = "tokenizer.json"  # HF tokenizers (Qwen2.5, Llama 3)
# Files beside a tokenizer.json that transformers reads with it; copied along unchanged.
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json")


def find_tokenizer(directory: str | os.PathLike) -> str | None:
  """The tokenizer file of a model dir: `tokenizer.model` when present (Llama 2's reference,
  which an HF Llama 2 dir ships next to a tokenizer.json), else `tokenizer.json`, else None."""
  for name in (SP_FILE, HF_FILE):
    p = os.path.join(directory, name)
    if os.path.isfile(p):
      return p
  return None


def load_tokenizer(path: str | os.PathLike):
  """A `Tokenizer` (SentencePiece) or `HFTokenizer` (`tokenizer.json`) for a file or a dir.

  Args:
    path: a tokenizer.model, a tokenizer.json, or a directory holding one.

  Returns:
    The tokenizer; both kinds share encode/encode_batch/decode and the id properties.
  """
  p = str(path)
  if os.path.isdir(p):
    found = find_tokenizer(p)
    if found is None:
      raise DataError(f"{p}: no {SP_FILE} or {HF_FILE} in this directory")
    p = found
  if p.endswith(".json"):
    from medjax.data.hf_tokenizer import HFTokenizer
    return HFTokenizer(p)
  return Tokenizer(p)


def copy_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
  """Copies a tokenizer into `out_dir` under its standard name, with a tokenizer.json's side
  files, and removes the other kind's file there (so `find_tokenizer` finds this one).

  Returns:
    The copied tokenizer file's path.
  """
  src = str(path)
  hf = src.endswith(".json")
  dst = os.path.join(out_dir, HF_FILE if hf else SP_FILE)
  stale = [SP_FILE] if hf else [HF_FILE, *HF_SIDE_FILES]
  for name in stale:
    if os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  if os.path.abspath(src) != os.path.abspath(dst):
    shutil.copyfile(src, dst)
    for name in HF_SIDE_FILES if hf else ():
      side = os.path.join(os.path.dirname(src), name)
      if os.path.isfile(side):
        shutil.copyfile(side, os.path.join(out_dir, name))
  return dst


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
    self._skip = {i for i in (self._sp.bos_id(), self.eos_id, self.pad_id) if i >= 0}

  @property
  def path(self) -> Path:
    return self._path

  @property
  def fingerprint(self) -> str:
    """Identifies the encoding: a hash of the model file."""
    return hashlib.sha256(self._path.read_bytes()).hexdigest()[:16]

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    """The underlying processor, for callers that need its full API."""
    return self._sp

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int | None:
    """The id `encode(bos=True)` prepends; None if the model has no BOS piece."""
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

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
    return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
        [self.eos_id] if eos and self.eos_id >= 0 else [])

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
