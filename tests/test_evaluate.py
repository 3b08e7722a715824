"""Evaluation: loglik parity with transformers, batch invariance, report arithmetic, perplexity."""

import math

import numpy as np
import pytest

import medjax
from medjax import cli
from medjax.evaluation import exam as evaluate
from medjax.evaluation import scoring
from medjax.data.cmexam import Question, format_prompt, read_cmexam
from hf_fixtures import make_hf_llama, TINYSTORIES

VOCAB = 97


class CharTok:
  """A hermetic char tokenizer: BOS=1, EOS=2, every char -> 4 + ord % 93.

  space_prefix mimics SentencePiece's dummy prefix: text encoded without BOS starts with an
  extra token 3, so an answer letter is two tokens.
  """

  bos_id, eos_id, vocab_size = 1, 2, VOCAB

  def __init__(self, space_prefix=False):
    self.space_prefix = space_prefix

  def encode(self, text, bos=True, eos=False):
    ids = [4 + ord(c) % (VOCAB - 4) for c in text]
    if self.space_prefix and not bos:
      ids = [3] + ids
    return ([1] if bos else []) + ids + ([2] if eos else [])

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


QUESTIONS = [
    Question("发热三天，最可能的诊断是", {"A": "感冒", "B": "肺炎", "C": "结核", "D": "哮喘",
                                "E": "过敏"}, "B", source="q:1"),
    Question("下列哪些是抗生素", {"A": "青霉素", "B": "阿司匹林", "C": "头孢", "D": "胰岛素"},
             "AC", source="q:2"),
    Question("短题", {"A": "是", "B": "否"}, "A", source="q:3"),
    Question("一个较长的题干，用来让这一行比其它行长得多，从而落入更长的长度桶里" * 2,
             {"A": "甲", "B": "乙", "C": "丙"}, "ABC", source="q:4"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  import torch
  d = tmp_path_factory.mktemp("tiny")
  hf = make_hf_llama(d, vocab=VOCAB, heads=4, kv_heads=2, seed=5)
  with torch.no_grad():  # peaked distributions and sharp attention, so errors show
    hf.lm_head.weight.mul_(5.0)
    for layer in hf.model.layers:
      layer.self_attn.q_proj.weight.mul_(8.0)
      layer.self_attn.k_proj.weight.mul_(8.0)
  hf.save_pretrained(str(d), safe_serialization=True)
  return hf, medjax.load(str(d))


def _hf_logprobs(hf, ids):
  """log_softmax of transformers' logits [T,V] for one unpadded row."""
  import torch
  with torch.no_grad():
    logits = hf(torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits, -1).numpy()


@pytest.mark.parametrize("space_prefix", [False, True])
def test_loglik_matches_transformers_and_ignores_batch_size(tiny, space_prefix):
  hf, m = tiny
  tok = CharTok(space_prefix)
  s1, _ = evaluate.score_cmexam(m.cfg, m.params, tok, QUESTIONS, batch_size=1)
  s16, _ = evaluate.score_cmexam(m.cfg, m.params, tok, QUESTIONS, batch_size=16)
  for a, b in zip(s1, s16):
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5

  newline = tok.encode("\n", bos=False)[-1]
  for q, scores in zip(QUESTIONS, s16):
    n = len(q.options)
    assert len(scores) == (n if not q.is_multi else 2**n - 1 - n)
    ctx = tok.encode(format_prompt(q), bos=True)
    for cand, got in scores.items():
      cont = tok.encode(cand, bos=False)
      lp = _hf_logprobs(hf, ctx + cont)
      want = sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
      if q.is_multi:  # ... and the answer ends: EOS or the newline before "解析：".
        want += np.logaddexp(lp[-1, tok.eos_id], lp[-1, newline])
      assert abs(got - want) <= 1e-4, (q.source, cand, got, want)


def test_token_logprobs_padding_invariant(tiny):
  import jax.numpy as jnp
  hf, m = tiny
  row = [1, 10, 20, 30, 40, 50]
  tokens = np.zeros((2, 16), np.int32)
  seg = np.zeros((2, 16), np.int32)
  tokens[0, :6], seg[0, :6] = row, 1
  tokens[1, :3], seg[1, :3] = row[:3], 1
  pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  lp = np.asarray(scoring.token_logprobs(m.cfg, m.params, jnp.asarray(tokens), seg, pos))
  ref = _hf_logprobs(hf, row)
  want = [ref[t - 1, row[t]] for t in range(1, 6)]
  np.testing.assert_allclose(lp[0, 1:6], want, atol=1e-4)
  np.testing.assert_allclose(lp[1, 1:3], lp[0, 1:3], atol=1e-5)


@pytest.mark.parametrize("text,letters,want", [
    ("B", "ABCDE", "B"),
    ("答案：B", "ABCDE", "B"),
    ("B。", "ABCDE", "B"),
    ("AB", "ABCDE", "AB"),
    ("DBA\n解析：C对", "ABCDE", "ABD"),
    ("A、C、E", "ABCDE", "ACE"),
    ("正确答案是 C", "ABCDE", "C"),
    ("答案为：Ｄ", "ABCDE", "D"),  # full-width letter
    ("Answer: E", "ABCDE", "E"),  # the A of "Answer" is not an option
    ("\n\n  C 肺炎", "ABCDE", "C"),
    ("答案：\nB", "ABCDE", "B"),
    ("选项F", "ABCDE", None),
    ("我不知道", "ABCDE", None),
    ("", "ABCDE", None),
    ("解析：A对", "ABCDE", None),  # letters only in an explanation do not count
])
def test_extract_answer(text, letters, want):
  assert evaluate.extract_answer(text, letters) == want


CSV = """Question,Options,Answer,Explanation,Difficulty level
q1,A 甲\\nB 乙\\nC 丙\\nD 丁,A,,easy
q2,A 甲\\nB 乙\\nC 丙\\nD 丁,B,,easy
q3,A 甲\\nB 乙\\nC 丙\\nD 丁\\nE 戊,AB,,hard
q4,A 甲\\nB 乙\\nC 丙,AC,,hard
q5,A 甲\\nB 乙\\nC 丙,C,,hard
bad,A 甲\\nC 丙,A,,hard
"""


@pytest.fixture
def csv_questions(tmp_path):
  p = tmp_path / "mini.csv"
  p.write_text(CSV, encoding="utf-8")
  qs, problems = read_cmexam(p)
  assert len(qs) == 5 and len(problems) == 1
  return qs, problems


def test_loglik_report_arithmetic(monkeypatch, csv_questions):
  qs, problems = csv_questions

  def fake_scores(cfg, params, tok, questions, batch_size, max_len, progress, placement=None):
    # The fake model always prefers "A" (single) or "AB" (multi).
    return [{c: (1.0 if c in ("A", "AB") else 0.0) for c in evaluate.candidates(q)}
            for q in questions], 0

  monkeypatch.setattr(evaluate, "score_cmexam", fake_scores)
  r = evaluate.evaluate_cmexam(None, None, None, qs, method="loglik", problems=problems)
  # Right: q1 (A) and q3 (AB). Wrong: q2, q4, q5.
  assert r["method"] == "loglik" and r["n"] == 5
  assert r["accuracy"] == pytest.approx(2 / 5)
  assert r["single"] == {"n": 3, "accuracy": pytest.approx(1 / 3),
                         "chance": pytest.approx((1 / 4 + 1 / 4 + 1 / 3) / 3)}
  # Multi chance: 5 options -> 1/26 letter sets of size >= 2; 3 options -> 1/4.
  assert r["multi"] == {"n": 2, "accuracy": pytest.approx(1 / 2),
                        "chance": pytest.approx((1 / 26 + 1 / 4) / 2)}
  assert r["chance"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 26 + 1 / 4 + 1 / 3) / 5)
  assert r["unparsed"]["count"] == 1 and r["unparsed"]["answers"] == []
  assert "option letters out of order" in r["unparsed"]["rows"][0]
  g = r["groups"]["Difficulty level"]
  assert g["easy"]["n"] == 2 and g["easy"]["accuracy"] == pytest.approx(1 / 2)
  assert g["hard"]["n"] == 3 and g["hard"]["accuracy"] == pytest.approx(1 / 3)
  table = evaluate.markdown_table(r)
  assert "| all (loglik) | 5 | 40.00 |" in table
  assert "| Difficulty level: hard | 3 | 33.33 |" in table


def test_generate_report_arithmetic(monkeypatch, csv_questions):
  qs, _ = csv_questions
  outputs = ["答案：A", "B。", "A、B\n解析：C错", "不知道", "A"]  # q4 unparsed, q5 wrong
  monkeypatch.setattr(evaluate, "predict_generate", lambda *a, **k: (outputs, 0))
  r = evaluate.evaluate_cmexam(None, None, None, qs, method="generate",
                               return_predictions=True)
  assert r["n"] == 5 and r["accuracy"] == pytest.approx(3 / 5)
  assert r["multi"]["accuracy"] == pytest.approx(1 / 2)
  assert r["unparsed"] == {"count": 1, "answers": [qs[3].source], "rows": []}
  assert [p["predicted"] for p in r["predictions"]] == ["A", "B", "AB", None, "A"]


def test_generate_method_end_to_end(tiny):
  """The real greedy path runs and every output is either parsed or counted as unparsed."""
  _, m = tiny
  r = evaluate.evaluate_cmexam(m.cfg, m.params, CharTok(), QUESTIONS, batch_size=3,
                               method="generate", max_new_tokens=4, return_predictions=True)
  assert r["n"] == len(QUESTIONS)
  assert all(len(p["output"]) <= 4 for p in r["predictions"])
  n_none = sum(p["predicted"] is None for p in r["predictions"])
  assert r["unparsed"]["count"] == n_none


DOCS = ["短文本一", "这是第二篇文档，长一些，用来测试分块。" * 2, "三"]


def test_perplexity_matches_transformers(tiny):
  hf, m = tiny
  tok = CharTok()
  total, n = 0.0, 0
  for d in DOCS:
    ids = tok.encode(d, bos=True, eos=True)
    lp = _hf_logprobs(hf, ids)
    total -= sum(lp[t - 1, ids[t]] for t in range(1, len(ids)))
    n += len(ids) - 1
  r = scoring.perplexity(m.cfg, m.params, tok, DOCS, batch_size=2)
  assert r["tokens"] == n and r["windows"] == 3
  assert r["nll"] == pytest.approx(total / n, abs=1e-5)
  assert r["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_perplexity_windows_overlap_by_one_token(tiny):
  hf, m = tiny
  tok = CharTok()
  ids = tok.encode(DOCS[1], bos=True, eos=True)  # 40 tokens
  assert len(ids) == 40
  # max_len 16: windows [0,16) [15,31) [30,40); each predicts all but its first token.
  total = 0.0
  for a, b in ((0, 16), (15, 31), (30, 40)):
    w = ids[a:b]
    lp = _hf_logprobs(hf, w)
    total -= sum(lp[t - 1, w[t]] for t in range(1, len(w)))
  r = scoring.perplexity(m.cfg, m.params, tok, [DOCS[1]], batch_size=4, max_len=16)
  assert r["windows"] == 3 and r["tokens"] == 39
  assert r["nll"] == pytest.approx(total / 39, abs=1e-5)


def test_eval_cli_needs_a_tokenizer(tmp_path, capsys):
  make_hf_llama(tmp_path / "ckpt", vocab=VOCAB)
  csv = tmp_path / "mini.csv"
  csv.write_text(CSV, encoding="utf-8")
  rc = cli.main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--cmexam", str(csv)])
  assert rc == 1
  err = capsys.readouterr().err
  assert str(tmp_path / "ckpt") in err and "tokenizer" in err


def test_eval_and_generate_cli_with_real_tokenizer(tmp_path, capsys):
  import json
  shared = TINYSTORIES
  make_hf_llama(tmp_path / "ckpt", vocab=512)
  tok = str(shared / "tokenizer.model")
  csv = tmp_path / "mini.csv"
  csv.write_text(CSV, encoding="utf-8")
  out = tmp_path / "r.json"
  base = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", tok]
  assert cli.main(["eval", *base, "--cmexam", str(csv), "--limit", "4", "--batch-size", "2",
                   "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["n"] == 4 and r["unparsed"]["count"] == 1 and len(r["predictions"]) == 4
  assert "| all (loglik) | 4 |" in capsys.readouterr().out
  txt = tmp_path / "t.txt"
  txt.write_text("One day a cat sat.\n\nThe dog ran home.\n", encoding="utf-8")
  assert cli.main(["eval", *base, "--text", str(txt), "--out", str(out)]) == 0
  assert json.loads(out.read_text())["documents"] == 2
  assert "| 2 | 19 |" in capsys.readouterr().out  # 2 docs, BOS + text + EOS each
  assert cli.main(["generate", *base, "--prompt", "Once upon", "--max-new-tokens", "5"]) == 0
  assert capsys.readouterr().out.startswith("Once upon")


def test_scoring_under_transfer_guard(tiny):
  """Scoring copies explicitly: it runs under jax.transfer_guard("disallow")."""
  import jax
  _, m = tiny
  want = scoring.perplexity(m.cfg, m.params, CharTok(), DOCS, batch_size=2)
  with jax.transfer_guard("disallow"):
    got = scoring.perplexity(m.cfg, m.params, CharTok(), DOCS, batch_size=2)
    scores, _ = evaluate.score_cmexam(m.cfg, m.params, CharTok(), QUESTIONS[:2], batch_size=2)
  assert got == want
  assert len(scores) == 2
