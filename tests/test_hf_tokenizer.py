"""tokenizer.json tokenizers (Qwen2.5/Llama 3 byte-level BPE) against AutoTokenizer; the
exported Llama 2 tokenizer.json against SentencePiece; prompts and SFT rows without BOS."""

import random

import pytest

from conftest_data import LLAMA_TOKENIZER, need
from hf_fixtures import make_bpe_tokenizer
from medjax import cli
from medjax.assets import asset_path
from medjax.data import cmexam, corpus, packing
from medjax.data.hf_tokenizer import HFTokenizer
from medjax.data.tokenizer import Tokenizer, load_tokenizer
from medjax.errors import DataError
from medjax.evaluation import exam
from medjax.model.config import LlamaConfig

WHITESPACE = [" leading space", "   three leading spaces", "two  spaces\n\nand lines",
              "multiple   inner    spaces", "trailing space ", "trailing spaces   ",
              "\ttab\tseparated\t", "new\nline\n", "\n\nleading newlines",
              " \n \t mixed \t\n ", "   ", "", "x" + " " * 20 + "y", "患者  发热 \n 三天"]


def _fuzz(n=300, seed=0):
  """Random strings of spaces, tabs, newlines, words, Chinese, digits and emoji."""
  rng = random.Random(seed)
  parts = [" ", "  ", "\t", "\n", "\r", "a", "the", " x", "患者", "，", "😀", "1", "23", "\u3000"]
  return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def _medical_texts():
  """Held-out medical documents (the BPE fixture trains on the first 400) and CMExam rows."""
  docs = corpus.read_texts([asset_path("medical_text_sample.csv")])[400:560]
  qs, _ = cmexam.read_cmexam(asset_path("cmexam_sample.csv"))
  return docs + [cmexam.format_prompt(q) + cmexam.format_response(q, True) for q in qs[:80]]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_bpe_encodes_as_autotokenizer(tmp_path, style):
  transformers = pytest.importorskip("transformers")
  ours = load_tokenizer(make_bpe_tokenizer(tmp_path, style=style))
  assert isinstance(ours, HFTokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  texts = _medical_texts() + WHITESPACE + ["<|endoftext|> 特殊", "Ｆｕｌｌ　ｗｉｄｔｈ e\u0301"]
  for t in texts:
    want = theirs(t)["input_ids"]
    assert ours.encode(t) == want, t
    assert ours.decode(want) == theirs.decode(want, skip_special_tokens=True), t
  assert ours.encode_batch(texts, eos=True) == [ours.encode(t, eos=True) for t in texts]
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
  assert (ours.bos_id is None) == (style == "qwen2")  # Qwen has no BOS
  assert ours.vocab_size == len(theirs)
  assert ours.encode("患者", bos=False, eos=True)[-1] == ours.eos_id
  assert ours.decode(ours.encode("患者发热三天。", eos=True)) == "患者发热三天。"


@pytest.mark.parametrize("model", ["tiny512", "llama2"])
def test_exported_sentencepiece_tokenizer_json_is_exact(tmp_path, model):
  """export-hf's tokenizer.json for a SentencePiece model: AutoTokenizer (transformers 5)
  and medjax's HFTokenizer on it encode exactly as SentencePiece, whitespace included."""
  transformers = pytest.importorskip("transformers")
  from medjax.checkpoints import hf_export
  path = (asset_path("tinystories-260k/tokenizer.model") if model == "tiny512"
          else need(LLAMA_TOKENIZER))
  sp = Tokenizer(path)
  hf_export.write_tokenizer_files(str(path), str(tmp_path), LlamaConfig())
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  as_json = HFTokenizer(tmp_path / "tokenizer.json")
  for t in WHITESPACE + _fuzz() + _medical_texts()[:40]:
    want = sp.encode(t)
    assert auto(t)["input_ids"] == want, repr(t)
    assert as_json.encode(t) == want, repr(t)
  assert (as_json.bos_id, as_json.eos_id, as_json.vocab_size) == (sp.bos_id, sp.eos_id,
                                                                   sp.vocab_size)
  if model == "llama2":  # what transformers 5 does with tokenizer.model alone (the old export)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    old = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert old(" leading space")["input_ids"] != sp.encode(" leading space")


def test_load_tokenizer_picks_the_kind(tmp_path):
  sp_path = asset_path("tinystories-260k/tokenizer.model")
  assert isinstance(load_tokenizer(sp_path.parent), Tokenizer)
  make_bpe_tokenizer(tmp_path / "bpe")
  assert isinstance(load_tokenizer(tmp_path / "bpe"), HFTokenizer)
  with pytest.raises(DataError, match="no tokenizer.model or tokenizer.json"):
    load_tokenizer(tmp_path)


def test_extend_refuses_bpe_base(tmp_path, capsys):
  tok = make_bpe_tokenizer(tmp_path / "bpe")
  rc = cli.main(["tokenizer", "extend", "--base", tok, "--corpus",
                 str(asset_path("medical_text_sample.csv")), "--add", "10",
                 "--out", str(tmp_path / "ext")])
  err = capsys.readouterr().err.strip()
  assert rc == 1 and "already covers Chinese" in err and tok in err and "\n" not in err, err
  assert not (tmp_path / "ext").exists()


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_prompts_and_sft_rows_with_and_without_bos(tmp_path, style):
  """Cut prompts keep the BOS when there is one and invent none when there is not (Qwen);
  CPT documents start with BOS only if the tokenizer has one."""
  tok = load_tokenizer(make_bpe_tokenizer(tmp_path, style=style))
  q = cmexam.Question("患者男性，45岁，发热三天。" * 30, {"A": "感冒", "B": "肺炎"}, "B", "解析" * 5)
  prompt = tok.encode(cmexam.format_prompt(q))
  seq_len = 64
  docs = packing.tokenize_sft([q], tok, seq_len)
  ids, w = docs.doc(0).tolist(), docs.weights[: docs.offsets[1]].tolist()
  response = tok.encode(cmexam.format_response(q), bos=False, eos=True)
  assert len(ids) == seq_len and ids[-len(response):] == response
  keep = 0 if style == "qwen2" else 1
  assert ids[:keep] == prompt[:keep] and prompt[-5:] == ids[-len(response) - 5: -len(response)]
  assert tok.bos_id is None or ids.count(tok.bos_id) == 1
  assert w == [0] * (seq_len - len(response) - 1) + [1] * len(response) + [0]
  cut, was_cut = exam._fit_prompt(prompt, 40, keep)
  assert was_cut and len(cut) == 40 and cut[:keep] == prompt[:keep] and cut[-5:] == prompt[-5:]
  assert (cut[0] == tok.bos_id) == (style == "llama3")
  doc = packing.tokenize_documents(["患者发热。"], tok).doc(0).tolist()
  assert doc == [tok.bos_id] * keep + tok.encode("患者发热。", bos=False, eos=True)
