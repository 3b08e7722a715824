"""Tokenizer: parity with Hugging Face LlamaTokenizer, errors, vocabulary extension."""

import pytest

from conftest_data import LLAMA_TOKENIZER, TINY_TOKENIZER, need
from conftest_data import llama_tok, tiny_tok  # noqa: F401  (fixtures)
from medjax.errors import DataError
from medjax.data.extend import extend_tokenizer
from medjax.data.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "患者男性，45岁，发热3天，伴咳嗽、咳痰。",
    "高血压 hypertension 患者 BP 160/100 mmHg",
    "12345 3.14159 2023年10月",
    "line one\nline two\n\nafter blank",
    "tab\there",
    "emoji 😀 and rare ∰ 𝔘 ꙮ",  # byte-fallback pieces in Llama
    "",
]
# Runs of spaces (and a leading space): HF's converted BPE (transformers 5, and the fast
# tokenizer since 4.x, huggingface/transformers#25069) can pick a different but equivalent
# split than SentencePiece, which Llama 2 was trained with, and drops a leading space. We
# follow SentencePiece; for these the test checks that the words agree.
WHITESPACE_RUNS = [
    " leading space",
    "   three leading spaces",
    "multiple   inner    spaces",
    "trailing space ",
]


def _hf(model_path):
  transformers = pytest.importorskip("transformers")
  # from_pretrained on the folder builds the tokenizer from its tokenizer.model.
  return transformers.LlamaTokenizer.from_pretrained(str(model_path.parent))


def _cmexam_questions(n=20):
  from medjax.data.cmexam import format_prompt, format_response, read_cmexam
  from medjax.assets import asset_path
  qs, _ = read_cmexam(asset_path("cmexam_sample.csv"))  # shipped: runs on a fresh clone
  return [format_prompt(q) + format_response(q, True) for q in qs[:n]]


@pytest.mark.parametrize("model", [LLAMA_TOKENIZER, TINY_TOKENIZER], ids=["llama2", "tiny512"])
def test_parity_with_hf(model):
  tok = Tokenizer(need(model))
  hf = _hf(model)
  texts = TEXTS + _cmexam_questions()
  for text in WHITESPACE_RUNS:
    want = hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)).split() == text.split()
    assert hf.decode(want, skip_special_tokens=True).split() == text.split()
  for text in texts:
    want = hf(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, bos=False) == want, text
    assert tok.encode(text) == [hf.bos_token_id] + want
    assert tok.encode(text, bos=False, eos=True) == want + [hf.eos_token_id]
    assert tok.decode(tok.encode(text, eos=True)) == hf.decode(want, skip_special_tokens=True)
  assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (hf.bos_token_id, hf.eos_token_id,
                                                   hf.unk_token_id)
  assert tok.vocab_size == len(hf)


def test_whitespace_follows_sentencepiece(llama_tok):
  # SentencePiece's dummy prefix plus the leading space give two pieces, as in Meta's code.
  assert [llama_tok.id_to_piece(i) for i in llama_tok.encode(" leading", bos=False)] == [
      "▁", "▁leading"]


def test_properties(llama_tok):
  assert (llama_tok.vocab_size, llama_tok.bos_id, llama_tok.eos_id) == (32000, 1, 2)
  assert llama_tok.pad_id == 0  # Llama has no pad piece
  ids = llama_tok.encode("患者", bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2
  assert llama_tok.decode(ids + [0, 0]) == "患者"  # bos/eos/pad skipped
  # Byte fallback round-trips characters missing from the vocabulary.
  assert llama_tok.decode(llama_tok.encode("ꙮ𝔘")) == "ꙮ𝔘"


def test_missing_and_corrupt_model(tmp_path):
  with pytest.raises(DataError, match="nothere.model"):
    Tokenizer(tmp_path / "nothere.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"this is not a protobuf")
  with pytest.raises(DataError, match="bad.model"):
    Tokenizer(bad)


def test_extend_tokenizer(tmp_path, tiny_tok):
  docs = _cmexam_questions(400)
  report = extend_tokenizer(tiny_tok.path, docs, add_n=300, out_dir=tmp_path / "ext")
  assert 0 < report["added"] <= 300
  assert report["vocab_size"] == 512 + report["added"]
  new = Tokenizer(tmp_path / "ext" / "tokenizer.model")
  assert new.vocab_size == report["vocab_size"]
  # Base pieces keep their ids, so a base checkpoint's embedding rows stay valid.
  for i in range(512):
    assert new.id_to_piece(i) == tiny_tok.id_to_piece(i)
  assert report["tokens_per_char_after"] < report["tokens_per_char_before"]
  text = "患者男性，发热三天。"
  assert new.decode(new.encode(text)) == text


def test_extended_tokenizer_matches_hugging_face_after_export(tmp_path, tiny_tok):
  """The extended tokenizer is what `export-hf` ships: transformers must encode the same ids."""
  transformers = pytest.importorskip("transformers")
  from medjax.model import config as config_lib
  from medjax.checkpoints import hf_export
  docs = _cmexam_questions(400)
  report = extend_tokenizer(tiny_tok.path, docs[:300], add_n=300, out_dir=tmp_path / "ext")
  out = tmp_path / "hf"
  out.mkdir()
  cfg = config_lib.LlamaConfig(vocab_size=report["vocab_size"])
  hf_export.write_tokenizer_files(str(tmp_path / "ext" / "tokenizer.model"), str(out), cfg)
  ours = Tokenizer(tmp_path / "ext" / "tokenizer.model")
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  held = [line for d in docs[300:] for line in d.splitlines() if line.strip() == line and line]
  assert len(held) > 50
  for line in held + TEXTS[:5]:
    assert theirs(line)["input_ids"] == ours.encode(line, bos=True), line
