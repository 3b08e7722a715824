"""Hugging Face `tokenizer.json` tokenizers (Qwen2.5's and Llama 3's byte-level BPE) through
the `tokenizers` library, behind the interface of the SentencePiece `data.tokenizer.Tokenizer`.

Special tokens follow what `transformers` does with the same files: the BOS is added when
`tokenizer_config.json` says `add_bos_token` (with a `bos_token`), else when the
`tokenizer.json` post-processor prepends one (Llama 3's `<|begin_of_text|>`); Qwen has none,
so `bos_id` is None there. EOS and pad come from `tokenizer_config.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from medjax.errors import DataError

CONFIG = "tokenizer_config.json"


def _token(v) -> str | None:
  """A special token in tokenizer_config.json: a string or an AddedToken dict."""
  return v.get("content") if isinstance(v, dict) else v


class HFTokenizer:
  """A `tokenizer.json` (BPE) with the special tokens of its `tokenizer_config.json`."""

  def __init__(self, path: str | os.PathLike):
    import tokenizers
    self._path = Path(path)
    if not self._path.is_file():
      raise DataError(f"{self._path}: tokenizer file not found")
    text = self._path.read_text(encoding="utf-8")
    try:
      spec = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{self._path}: not valid JSON ({e})") from None
    model_type = (spec.get("model") or {}).get("type") if isinstance(spec, dict) else None
    if model_type != "BPE":
      raise DataError(f"{self._path}: model.type={model_type!r} is not supported (BPE only: "
                      "the byte-level BPE of Qwen2.5 and Llama 3, or SentencePiece-style BPE)")
    try:
      self._tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception
      raise DataError(f"{self._path}: cannot load with tokenizers ({e})") from None
    cfg_path = self._path.with_name(CONFIG)
    self._config = {}
    if cfg_path.is_file():
      try:
        self._config = json.loads(cfg_path.read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path}: not valid JSON ({e})") from None
    # As transformers: special-token strings in the text are their ids unless this is set.
    self._tok.encode_special_tokens = bool(self._config.get("split_special_tokens", False))
    self._bos = self._find_bos()
    self._eos = self._id(_token(self._config.get("eos_token")), "eos_token")
    pad = self._id(_token(self._config.get("pad_token")), "pad_token")
    self._pad = pad if pad is not None else (self._eos if self._eos is not None else 0)
    self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self._fingerprint = hashlib.sha256(
        text.encode() + json.dumps([self._bos, self._eos, self._pad]).encode()).hexdigest()[:16]

  def _id(self, token: str | None, field: str) -> int | None:
    if token is None:
      return None
    i = self._tok.token_to_id(token)
    if i is None:
      raise DataError(f"{self._path.with_name(CONFIG)}: {field}={token!r} is not in "
                      f"{self._path.name}")
    return i

  def _find_bos(self) -> int | None:
    c = self._config
    if "add_bos_token" in c or "add_eos_token" in c:  # transformers rebuilds the template
      bos = _token(c.get("bos_token"))
      return self._id(bos, "bos_token") if c.get("add_bos_token") and bos else None
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    lead = full[: full.index(plain[0])] if plain and plain[0] in full else []
    if len(lead) > 1:
      raise DataError(f"{self._path}: post_processor prepends {len(lead)} tokens; only a "
                      "single BOS is supported")
    return lead[0] if lead else None

  @property
  def path(self) -> Path:
    return self._path

  @property
  def fingerprint(self) -> str:
    """Identifies the encoding: a hash of tokenizer.json and the special-token ids."""
    return self._fingerprint

  @property
  def vocab_size(self) -> int:
    """Highest id + 1 (added tokens included); embeddings may have more rows (Qwen pads)."""
    return self._vocab_size

  @property
  def bos_id(self) -> int | None:
    """The id prepended by `encode(bos=True)`; None for tokenizers without one (Qwen)."""
    return self._bos

  @property
  def eos_id(self) -> int:
    return -1 if self._eos is None else self._eos

  @property
  def unk_id(self) -> int:
    unk = _token(self._config.get("unk_token"))
    i = self._tok.token_to_id(unk) if unk else None
    return -1 if i is None else i

  @property
  def pad_id(self) -> int:
    # Padded positions carry loss_mask 0 and segment id 0, so any valid id does.
    return self._pad

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    pre = [self._bos] if bos and self._bos is not None else []
    return pre + ids + ([self._eos] if eos and self._eos is not None else [])

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Encodes one string.

    Args:
      text: the text (special-token strings in it become their ids, as in transformers).
      bos: prepend `bos_id` if this tokenizer has one.
      eos: append `eos_id`.

    Returns:
      Token ids.
    """
    return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

  def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                   num_threads: int = -1) -> list[list[int]]:
    """Encodes many strings in the `tokenizers` thread pool.

    Args:
      texts: the strings.
      bos: prepend `bos_id` (if any) to each.
      eos: append `eos_id` to each.
      num_threads: unused (RAYON_NUM_THREADS sets the pool); kept for the common interface.

    Returns:
      One id list per string.
    """
    del num_threads
    batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: 0.21+
    encs = batch(list(texts), add_special_tokens=False)
    return [self._wrap(e.ids, bos, eos) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to text, skipping special tokens (HF's `skip_special_tokens=True`)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i)) or ""

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"
