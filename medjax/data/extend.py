"""Vocabulary extension, as Chinese-LLaMA-2 does it: train a SentencePiece model on domain
text, then append its pieces that the base vocabulary lacks to the base `ModelProto`. Pieces
are only appended, so every base id keeps its meaning and its embedding row
(`checkpoints.vocab` grows the embeddings to match).
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from medjax.data.tokenizer import HF_FILE, Tokenizer
from medjax.errors import DataError


def refuse_bpe_base(base: str | os.PathLike) -> None:
  """Byte-level BPE bases (tokenizer.json: Qwen2.5, Llama 3) are not extended.

  Raises:
    DataError: `base` is, or is a directory holding, a tokenizer.json.
  """
  p = Path(base)
  if p.suffix == ".json" or (p.is_dir() and (p / HF_FILE).exists()):
    raise DataError(
        f"{base}: a byte-level BPE tokenizer (tokenizer.json) already covers Chinese (every "
        "character encodes, as bytes at worst, and the Qwen2.5 and Llama 3 vocabularies were "
        "built on multilingual text); vocabulary extension is for SentencePiece bases such "
        "as Llama 2's tokenizer.model")


def _load_proto(path: Path) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(path.read_bytes())
  except OSError as e:
    raise DataError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
  except Exception as e:  # protobuf's DecodeError has no stable import path
    raise DataError(f"{path}: not a SentencePiece model ({e})") from None
  if not proto.pieces:
    raise DataError(f"{path}: not a SentencePiece model (no pieces)")
  return proto


def _covered_chars(texts: Sequence[str], coverage: float) -> int:
  """How many distinct characters SentencePiece keeps at `character_coverage=coverage`."""
  counts = collections.Counter()
  for t in texts:
    counts.update(t)
  total, run = sum(counts.values()), 0
  for n, (_, c) in enumerate(counts.most_common(), 1):
    run += c
    if run >= coverage * total:
      return n
  return len(counts)


def tokens_per_char(tok: Tokenizer, texts: Sequence[str]) -> float:
  """Tokens (without bos/eos) per character over `texts`: lower means a better fit."""
  chars = sum(len(t) for t in texts)
  toks = sum(len(ids) for ids in tok.encode_batch(texts, bos=False))
  return toks / max(chars, 1)


def extend_tokenizer(base_model_path: str | os.PathLike, texts: Sequence[str], add_n: int,
                     out_dir: str | os.PathLike, *, model_type: str = "bpe",
                     train_vocab_size: int | None = None, heldout_fraction: float = 0.05,
                     max_sentence_length: int = 16384) -> dict:
  """Adds up to `add_n` domain pieces to a base SentencePiece model (Chinese-LLaMA-2 style).

  Args:
    base_model_path: the base `tokenizer.model` (e.g. Llama 2's).
    texts: domain documents. The last `heldout_fraction` of them is held out of training
      and used to measure tokens per character before and after.
    add_n: the most pieces to add.
    out_dir: where `tokenizer.model` is written (created if needed).
    model_type: SentencePiece trainer type, "bpe" or "unigram".
    train_vocab_size: vocabulary of the domain model; default: its covered characters plus
      `2 * add_n + 100`, so enough new pieces remain after dropping those the base has.
    heldout_fraction: share of `texts` held out for the before/after measurement.
    max_sentence_length: longest training line in bytes; longer lines are skipped by SP.

  Returns:
    A report dict: base/new vocab sizes, pieces added, tokens per char before/after, path.
  """
  refuse_bpe_base(base_model_path)
  base_path = Path(base_model_path)
  base = _load_proto(base_path)
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise DataError("extend_tokenizer: no non-empty training texts")
  n_held = max(1, int(len(texts) * heldout_fraction)) if len(texts) > 1 else 0
  train, held = texts[: len(texts) - n_held], texts[len(texts) - n_held:] or texts
  coverage = 0.9995
  # SentencePiece needs a piece for every character it covers, on top of merged pieces.
  vocab = train_vocab_size or _covered_chars(train, coverage) + add_n * 2 + 100

  # Train in memory; SentencePiece wants lines, so feed one line per non-empty text line.
  def lines():
    for t in train:
      for line in t.splitlines():
        if line.strip():
          yield line

  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "domain")
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab,
          model_type=model_type, character_coverage=coverage, byte_fallback=False,
          max_sentence_length=max_sentence_length, hard_vocab_limit=False,
          split_digits=True, minloglevel=2)
    except RuntimeError as e:
      raise DataError(f"extend_tokenizer: SentencePiece training failed ({e})") from None
    domain = _load_proto(Path(prefix + ".model"))

  have = {p.piece for p in base.pieces}
  added = []
  normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
  top = max((p.score for p in base.pieces if p.type == normal), default=0.0) + 1.0

  def add(piece):
    new = base.pieces.add()
    new.piece, new.type = piece, sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    # Above every base score (Chinese-LLaMA-2 uses 0; Llama 2's are all <= -1), so BPE
    # prefers the new domain pieces; strictly decreasing, so Hugging Face's converter orders
    # the merges as SentencePiece does (equal scores tie-break differently there).
    new.score = top - 1e-6 * len(added)
    have.add(piece)
    added.append(piece)

  for p in domain.pieces:
    # NORMAL pieces only: the domain model's <unk>/<s>/</s> duplicate the base control pieces.
    if p.type != sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL or p.piece in have:
      continue
    # A merged piece's characters go in first: SentencePiece can merge characters it does not
    # have, but Hugging Face's converter derives BPE merges only from pieces in the vocabulary,
    # so without them an exported tokenizer would byte-fallback where medjax does not.
    chars = [ch for ch in dict.fromkeys(p.piece) if ch not in have]
    if len(added) + len(chars) + 1 > add_n:
      break
    for ch in chars:
      add(ch)
    add(p.piece)

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  out_path = out / "tokenizer.model"
  out_path.write_bytes(base.SerializeToString())
  before, after = Tokenizer(base_path), Tokenizer(out_path)
  return {
      "base_vocab_size": before.vocab_size,
      "vocab_size": after.vocab_size,
      "added": len(added),
      "sample_added": added[:20],
      "heldout_docs": len(held),
      "tokens_per_char_before": round(tokens_per_char(before, held), 4),
      "tokens_per_char_after": round(tokens_per_char(after, held), 4),
      "path": str(out_path),
  }
