"""A SentencePiece BPE model as a Hugging Face `tokenizer.json` that encodes exactly as
SentencePiece does, as Meta's Llama-2 HF repo ships one.

transformers 5 rebuilds `LlamaTokenizer` from `tokenizer.model` with a Metaspace
pre-tokenizer that drops a lone leading "▁" (" leading" -> ["▁leading"], SentencePiece:
["▁", "▁leading"]) and merges space runs in another order ("two  spaces": ["▁▁", "spaces"],
SentencePiece: ["▁", "▁spaces"]). The file written here reproduces SentencePiece instead,
and `export-hf` names the generic `PreTrainedTokenizerFast` class, which loads it as is:

- normalizer: SentencePiece's `remove_extra_whitespaces` (strip and collapse U+0020 only),
  its dummy prefix "▁", then every " " -> "▁"; no pre-tokenizer, so BPE sees the whole
  text, as SentencePiece's BPE does;
- merges: every split of a piece into two pieces, ranked by the merged piece's score, high
  first. SentencePiece breaks equal scores (Llama 2's whitespace-only pieces all score -1e9)
  by position, leftmost first; ranking longer merged pieces first, then longer left parts,
  gives the same greedy left-to-right growth of space runs.

tests/test_hf_tokenizer.py compares the two on whitespace edge cases and random strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from medjax.errors import DataError

_P = sentencepiece_model_pb2.ModelProto.SentencePiece
_BPE = sentencepiece_model_pb2.TrainerSpec.BPE


def _load(path: str | Path) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(Path(path).read_bytes())
  except Exception as e:  # protobuf's DecodeError has no stable import path
    raise DataError(f"{path}: not a SentencePiece model ({e})") from None
  return proto


def why_not_exact(proto: sentencepiece_model_pb2.ModelProto) -> str | None:
  """Why this model's encoding has no exact `tokenizer.json` form here, or None."""
  ns = proto.normalizer_spec
  if proto.trainer_spec.model_type != _BPE:
    return "not a BPE model"
  if ns.precompiled_charsmap or ns.name not in ("", "identity"):
    return f"normalization rule {ns.name!r}"
  if proto.trainer_spec.treat_whitespace_as_suffix:
    return "treat_whitespace_as_suffix"
  odd = {p.type for p in proto.pieces} - {_P.NORMAL, _P.CONTROL, _P.UNKNOWN, _P.BYTE}
  if odd:
    return "user-defined or unused pieces"
  return None


def tokenizer_json(model_path: str | Path) -> dict[str, Any] | None:
  """The `tokenizer.json` dict of a SentencePiece model, or None when it has no exact form
  (`why_not_exact`). The post-processor prepends BOS, as `add_bos_token=True` does."""
  proto = _load(model_path)
  if why_not_exact(proto):
    return None
  pieces = proto.pieces
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  normal = {p.piece for p in pieces if p.type == _P.NORMAL}
  merges = []
  for i, p in enumerate(pieces):
    if p.type != _P.NORMAL:
      continue
    s = p.piece
    for k in range(1, len(s)):
      if s[:k] in normal and s[k:] in normal:
        merges.append((-p.score, -len(s), -k, i, s[:k], s[k:]))
  merges.sort()
  ns = proto.normalizer_spec
  norms = []
  if ns.remove_extra_whitespaces:  # onig regex: \A/\z, since ^/$ also match at newlines
    norms += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
              {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
  if ns.add_dummy_prefix:
    norms.append({"type": "Prepend", "prepend": "▁"})
  norms.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
  specials = [(i, p.piece) for i, p in enumerate(pieces) if p.type in (_P.CONTROL, _P.UNKNOWN)]
  bos = pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
  post = None
  if bos is not None:
    tmpl = lambda *seq: [{"SpecialToken": {"id": bos, "type_id": 0}}] + [
        {"Sequence": {"id": s, "type_id": t}} for s, t in seq]
    post = {"type": "TemplateProcessing", "single": tmpl(("A", 0)),
            "pair": tmpl(("A", 0), ("B", 1)),
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}}
  unk = pieces[proto.trainer_spec.unk_id].piece
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}
                       for i, s in specials],
      "normalizer": {"type": "Sequence", "normalizers": norms},
      "pre_tokenizer": None,
      "post_processor": post,
      "decoder": {"type": "Sequence", "decoders": [
          {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
          {"type": "ByteFallback"}, {"type": "Fuse"},
          {"type": "Strip", "content": " ", "start": 1 if ns.add_dummy_prefix else 0,
           "stop": 0}]},
      "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": True, "byte_fallback": proto.trainer_spec.byte_fallback,
                "ignore_merges": False, "vocab": vocab,
                "merges": [[left, right] for *_, left, right in merges]},
  }
