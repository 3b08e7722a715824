"""Data pipelines: packing invariants, SFT masks, mixtures, sharding, resume; corpus readers."""

import json

import numpy as np
import pytest

from conftest_data import tiny_tok  # noqa: F401  (fixture)
from medjax.data import cmexam
from medjax.data import corpus
from medjax.assets import asset_path
from medjax.data import from_config, overlap, packing, pipeline, preview
from medjax.errors import DataError

T = 16


def _synthetic_docs(lengths, base=3, seed=0):
  """Docs with unique token values (so every token can be traced), BOS..EOS framed."""
  rng = np.random.default_rng(seed)
  ids = [[1] + rng.integers(base, 500, n - 2).tolist() + [2] for n in lengths]
  return packing.TokenizedDocs.from_lists(ids), ids


def _check_rows(rows, ids):
  """Rebuilds every document from the rows and checks the batch contract on the way."""
  rebuilt = {}
  next_doc = 0
  for r in range(len(rows)):
    row = rows[r]
    seg, pos, inp = row["segment_ids"], row["positions"], row["inputs"]
    assert all(v.shape == (T,) for v in row.values())
    assert row["inputs"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
    used = seg > 0
    assert not np.any(seg[~used]) and np.all(row["loss_mask"][~used] == 0)
    assert np.all(seg[used] == np.sort(seg[used]))  # segments are contiguous runs
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart
      toks = inp[where].tolist()
      # The segment continues the open document or starts the next one (BOS).
      if toks[0] == 1 and (next_doc not in rebuilt or len(rebuilt[next_doc]) ==
                           len(ids[next_doc])):
        d = next_doc if next_doc not in rebuilt else next_doc + 1
        rebuilt[d] = []
        next_doc = d
      doc = ids[next_doc]
      start = len(rebuilt[next_doc])
      rebuilt[next_doc] += toks
      for k, p in enumerate(where):
        i = start + k  # index of this token within its document
        if i + 1 < len(doc):
          assert row["loss_mask"][p] == 1 and row["targets"][p] == doc[i + 1]
        else:
          assert row["loss_mask"][p] == 0  # EOS: the next token is another document
  return rebuilt


@pytest.mark.parametrize("mode", ["concat", "fit", "single"])
def test_packing_loses_and_duplicates_nothing(mode):
  lengths = [5, 9, 16, 3, 40, 7, 2, 17, 11]  # some longer than a row (T=16)
  docs, ids = _synthetic_docs(lengths)
  rows = packing.PackedRows(docs, T, mode, pad_id=0)
  rebuilt = _check_rows(rows, ids)
  assert [rebuilt[d] for d in range(len(ids))] == ids
  total = sum(int((rows[r]["segment_ids"] > 0).sum()) for r in range(len(rows)))
  assert total == sum(lengths)
  if mode == "concat":
    assert len(rows) == -(-sum(lengths) // T)  # no padding except in the last row
  elif mode == "single":
    assert all(len(set(rows[r]["segment_ids"].tolist()) - {0}) == 1 for r in range(len(rows)))
  else:
    # "fit" never splits a document that fits in a row.
    for d, n in enumerate(lengths):
      if n <= T:
        assert sum(1 for p in rows.pieces if p[0] == d) == 1


def test_cpt_iterator_epoch_covers_every_token_once(tiny_tok):
  texts = [f"Story {i}: the cat sat on the mat {i * 7} times." * (1 + i % 4) for i in range(30)]
  docs = packing.tokenize_documents(texts, tiny_tok)
  rows = packing.PackedRows(docs, T, "concat", tiny_tok.pad_id)
  it = pipeline.make_cpt_iterator(texts, tiny_tok, T, batch_size=1, seed=3, num_epochs=1)
  batches = list(it)
  assert len(batches) == len(rows)
  got = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  assert sorted(got.tolist()) == sorted(docs.tokens.tolist())
  # Shuffled: the first row is not the first document's start.
  assert not np.array_equal(batches[0]["inputs"][0], rows[0]["inputs"])
  assert set(batches[0]) == set(packing.FIELDS)
  assert all(b["inputs"].shape == (1, T) and b["targets"].dtype == np.int32 for b in batches)


def test_process_sharding_is_disjoint_and_complete():
  docs, _ = _synthetic_docs([9] * 40)
  shards = []
  for pi in range(2):
    it = pipeline.make_cpt_iterator(docs, _FakeTok(), T, batch_size=2, seed=1, process_index=pi,
                                process_count=2, num_epochs=1)
    shards.append([tuple(r) for b in it for r in b["inputs"]])
  assert shards[0] and len(shards[0]) == len(shards[1])
  assert not set(shards[0]) & set(shards[1])
  n_rows = len(packing.PackedRows(docs, T, "concat", 0))
  # Both processes stop after the last complete global batch (of 2 rows).
  assert len(shards[0]) + len(shards[1]) == n_rows // 2 * 2
  with pytest.raises(DataError, match="divisible"):
    pipeline.make_cpt_iterator(docs, _FakeTok(), T, batch_size=3, process_count=2)


class _FakeTok:
  pad_id = 0


def test_sft_loss_mask_covers_response_only(tiny_tok):
  qs = [cmexam.Question(f"Which one {i}?", {"A": "red", "B": "blue", "C": "green"},
                        "AC" if i % 2 else "B", f"Because {i}.") for i in range(6)]
  for with_expl in (False, True):
    it = pipeline.make_sft_iterator(qs, tiny_tok, 256, batch_size=1, seed=0,
                                with_explanation=with_expl, num_epochs=1)
    seen, most = 0, 0
    for b in it:
      most = max(most, int(b["segment_ids"].max()))
      for r in range(1):
        seg = b["segment_ids"][r]
        for s in range(1, seg.max() + 1):
          where = np.flatnonzero(seg == s)
          ids, mask = b["inputs"][r][where], b["loss_mask"][r][where]
          trained = b["targets"][r][where][mask == 1].tolist()
          prompt_len = int(np.argmax(mask))  # first trained position predicts the response
          text = tiny_tok.decode(ids[:prompt_len + 1])
          prompt = lambda q: tiny_tok.decode(tiny_tok.encode(cmexam.format_prompt(q)))  # noqa
          q = next(q for q in qs if prompt(q) == text)
          want = tiny_tok.encode(cmexam.format_response(q, with_expl), bos=False, eos=True)
          assert trained == want  # exactly the response + EOS are trained
          assert np.all(mask[:prompt_len] == 0) and mask[-1] == 0
          seen += 1
    assert seen == 6
    if not with_expl:
      assert most > 1  # packed: a row holds several short examples
  unpacked = pipeline.make_sft_iterator(qs, tiny_tok, 256, 1, seed=0, pack=False, num_epochs=1)
  assert [int(b["segment_ids"].max()) for b in unpacked] == [1] * 6


def test_sft_truncation_drops_explanation_then_cuts_prompt_left(tiny_tok):
  q = cmexam.Question("long " * 60, {"A": "x", "B": "y"}, "B", "explained " * 40)
  docs = packing.tokenize_sft([q], tiny_tok, 64, with_explanation=True)
  ids, w = docs.doc(0).tolist(), docs.weights.tolist()
  assert len(ids) <= 64 and ids[0] == tiny_tok.bos_id
  trained = [ids[i + 1] for i in range(len(ids) - 1) if w[i]]
  assert trained == tiny_tok.encode("B", bos=False, eos=True)  # the answer survives
  answer_cue = tiny_tok.encode("B. y\n答案：", bos=False)
  assert ids[-len(trained) - 3:-len(trained)] == answer_cue[-3:]  # prompt end kept
  with pytest.raises(DataError, match="seq_len"):
    packing.tokenize_sft([q], tiny_tok, 3)


def test_mixture_ratio():
  a, _ = _synthetic_docs([T] * 50, base=3, seed=1)  # token values < 500
  b = packing.TokenizedDocs.from_lists([[1] + [600 + i % 50] * (T - 2) + [2] for i in range(50)])
  it = pipeline.make_cpt_iterator([(a, 0.75), (b, 0.25)], _FakeTok(), T, batch_size=10, seed=0)
  rows = np.concatenate([next(it)["inputs"] for _ in range(60)])
  from_b = np.mean([(r >= 600).any() for r in rows])
  assert abs(from_b - 0.25) < 0.03
  with pytest.raises(DataError, match="num_epochs"):
    pipeline.make_cpt_iterator([(a, 1.0), (b, 1.0)], _FakeTok(), T, 2, num_epochs=1)


@pytest.mark.parametrize("kind", ["cpt", "mixture", "sft"])
def test_resume_gives_identical_next_batch(kind, tiny_tok):
  texts = [f"Doc {i} " + "word " * (i % 13) for i in range(40)]
  qs = [cmexam.Question(f"Q{i}?", {"A": "a", "B": "b"}, "A", "") for i in range(20)]

  def make():
    if kind == "cpt":
      return pipeline.make_cpt_iterator(texts, tiny_tok, T, 4, seed=5)
    if kind == "mixture":
      return pipeline.make_cpt_iterator([(texts, 0.7), (texts[:10], 0.3)], tiny_tok, T, 4, seed=5)
    return pipeline.make_sft_iterator(qs, tiny_tok, 64, 4, seed=5)

  it = make()
  for _ in range(7):  # past the end of the first epoch too
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  want = [next(it) for _ in range(3)]
  it2 = make()
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in packing.FIELDS:
      np.testing.assert_array_equal(got[k], w[k])


def test_eval_batches_cover_everything_once(tiny_tok):
  texts = [f"Validation doc {i} " * (1 + i % 5) for i in range(23)]
  docs = packing.tokenize_documents(texts, tiny_tok)
  per_proc = [list(pipeline.eval_batches(texts, tiny_tok, T, 4, process_index=p, process_count=2))
              for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) > 0
  toks = [b["inputs"][b["segment_ids"] > 0] for bs in per_proc for b in bs]
  assert sorted(np.concatenate(toks).tolist()) == sorted(docs.tokens.tolist())
  assert sum(float(b["loss_mask"].sum()) for bs in per_proc for b in bs) == (
      docs.num_tokens - docs.num_docs)  # every within-document target, once
  assert all(b["inputs"].shape == (2, T) for bs in per_proc for b in bs)
  again = list(pipeline.eval_batches(texts, tiny_tok, T, 4, process_index=0, process_count=2))
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(again, per_proc[0]))


def test_render_row_marks_untrained_tokens(tiny_tok):
  q = cmexam.Question("Pick?", {"A": "yes", "B": "no"}, "A", "")
  b = next(pipeline.make_sft_iterator([q], tiny_tok, 256, 1, seed=0))
  text = preview.render_row(b, tiny_tok)
  # The prompt (with BOS) is bracketed as untrained; the answer and EOS are trained.
  assert text.startswith("[segment 1, ") and "⟦<s>" + cmexam.PROMPT_HEADER in text
  assert text.splitlines()[-2].endswith("答案：⟧A</s>") and "[padding:" in text


# ----------------------------------------------------------------------------- corpus


def test_corpus_txt_blank_lines_and_eot(tmp_path):
  (tmp_path / "a.txt").write_text("第一篇\n第二行\n\n\n第二篇\n\n  \n第三篇\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("Story one.\n\nSame story.\n<|endoftext|>\nStory two.\n"
                                  "<|endoftext|>\n", encoding="utf-8")
  docs = corpus.read_documents(tmp_path)
  assert [d.text for d in docs] == ["第一篇\n第二行", "第二篇", "第三篇",
                                    "Story one.\n\nSame story.", "Story two."]
  assert docs[1].source == f"{tmp_path / 'a.txt'}:5"


def test_corpus_jsonl_and_csv(tmp_path):
  (tmp_path / "d.jsonl").write_text('{"text": "甲"}\n\n{"text": "乙", "id": 2}\n',
                                    encoding="utf-8")
  (tmp_path / "e.csv").write_text("department,title,ask,answer\n内科,头痛,\"头痛\n三天\",休息\n"
                                  "内科,发热,,多喝水\n", encoding="utf-8")
  assert corpus.read_texts(tmp_path / "d.jsonl") == ["甲", "乙"]
  docs = corpus.read_documents(tmp_path / "e.csv")
  assert [d.text for d in docs] == ["头痛\n头痛\n三天\n休息", "发热\n多喝水"]
  assert docs[1].source.endswith("e.csv:4")
  assert corpus.read_texts(tmp_path / "e.csv", columns=["answer"]) == ["休息", "多喝水"]
  with pytest.raises(DataError, match=r"e\.csv:1: missing column 'body'"):
    corpus.read_texts(tmp_path / "e.csv", columns=["body"])
  (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text'"):
    corpus.read_texts(tmp_path / "bad.jsonl")


def test_corpus_errors(tmp_path):
  (tmp_path / "gb.txt").write_bytes("病人\n发热".encode("gb18030"))
  with pytest.raises(DataError, match=r"gb\.txt:1: not UTF-8"):
    corpus.read_texts(tmp_path / "gb.txt")
  (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"empty\.txt: no documents"):
    corpus.read_texts(tmp_path / "empty.txt")
  with pytest.raises(DataError, match="nope"):
    corpus.read_texts(tmp_path / "nope.txt")


def test_split_documents_is_stable():
  docs = [f"document number {i}" for i in range(2000)]
  train, val = corpus.split_documents(docs, 0.1, seed=0)
  assert len(train) + len(val) == 2000 and 150 < len(val) < 250
  # Membership depends on the text only: shuffling and subsetting do not move documents.
  train2, val2 = corpus.split_documents(list(reversed(docs[:1000])), 0.1, seed=0)
  assert set(val2) == set(val) & set(docs[:1000])
  assert set(corpus.split_documents(docs, 0.1, seed=1)[1]) != set(val)


def test_ngram_overlap_finds_contamination(tmp_path):
  qs = [cmexam.Question("上消化道出血可单纯表现为呕血或黑便，这取决于",
                        {"A": "原发病", "B": "出血量"}, "B"),
        cmexam.Question("夜间阵发性呼吸困难可见于", {"A": "癔病", "B": "左心功能不全"}, "B")]
  docs = [corpus.Document("教材：上消化道出血可单纯 表现为呕血或黑便。", "c.txt:1"),
          corpus.Document("完全无关的一段文字，讲的是高血压的饮食。", "c.txt:3")]
  ov = overlap.ngram_overlap([q.question for q in qs], docs, n=13)
  assert set(ov.hits) == {0} and ov.dirty_docs == {0}  # whitespace is ignored
  assert ov.example[0][1] == "c.txt:1" and len(ov.example[0][0]) == 13


def test_cli_build_show_overlap(tmp_path, capsys):
  import argparse

  from medjax.cli import data as data_cli
  csv_path = tmp_path / "cmexam_val.csv"
  csv_path.write_text("Question,Options,Answer,Explanation\n"
                      "哪项正确,A 甲\\nB 乙\\nC 丙\\nD 丁,B,因为\n"
                      "坏行,B 乙\\nC 丙,B,\n", encoding="utf-8")
  p = argparse.ArgumentParser()
  data_cli.add_args(p)
  data_cli.run(p.parse_args(["build", "cmexam", "--input", str(csv_path),
                             "--out", str(tmp_path / "tfds")]))
  out = capsys.readouterr().out
  assert "cmexam validation: 1 examples" in out and "cmexam_val.csv:3: option letters" in out
  from medjax.data import builders as datasets
  (q,) = datasets.load_questions(tmp_path / "tfds", "validation")
  assert q.answer == "B" and q.options["A"] == "甲" and q.source.endswith("cmexam_val.csv:2")

  data_cli.run(p.parse_args(["show", "--kind", "sft", "--input", str(csv_path)]))
  assert "答案：⟧B</s>" in capsys.readouterr().out

  corpus_path = tmp_path / "c.txt"
  corpus_path.write_text("题目：哪项正确？\n\n别的文字\n", encoding="utf-8")
  data_cli.run(p.parse_args(["overlap", "--corpus", str(corpus_path), "--eval", str(csv_path),
                             "--n", "4", "--write-filtered", str(tmp_path / "clean.jsonl")]))
  assert "1 of 1 eval questions" in capsys.readouterr().out
  assert corpus.read_texts(tmp_path / "clean.jsonl") == ["别的文字"]


def test_tfds_medical_text_round_trip(tmp_path):
  from medjax.data import builders as datasets
  texts = [f"病例{i}：患者发热{i}天。" for i in range(300)]
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "docs.txt").write_text("\n\n".join(texts), encoding="utf-8")
  datasets.build("medical_text", tmp_path / "in", tmp_path / "tfds")
  train = datasets.load_texts(tmp_path / "tfds", "train")
  val = datasets.load_texts(tmp_path / "tfds", "validation")
  assert sorted(train + val) == sorted(texts)
  assert set(val) == set(corpus.split_documents(texts, 0.02)[1])


def test_training_reads_built_datasets(tmp_path, tiny_tok):
  """`data.train = "tfds:DIR"` trains on the built train split, validates on its validation."""
  from medjax.data import builders as datasets
  from medjax.training import config as runconfig
  texts = [f"病例{i}：患者发热{i}天。" for i in range(300)]
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "docs.txt").write_text("\n\n".join(texts), encoding="utf-8")
  datasets.build("medical_text", tmp_path / "in", tmp_path / "tfds")
  c = runconfig.base_config()
  c.task, c.batch_size, c.data.seq_len = "cpt", 2, 32
  c.data.train = f"tfds:{tmp_path / 'tfds'}"
  it, val = from_config.make_data(c, tiny_tok, log=lambda m: None)
  assert sorted(val) == sorted(datasets.load_texts(tmp_path / "tfds", "validation"))
  assert next(it)["inputs"].shape == (2, 32)
  # SFT: a cmexam build with train.csv only has no validation split; none is invented.
  import csv
  with open(asset_path("cmexam_sample.csv"), encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f))[:41]  # header + 40 questions
  (tmp_path / "cm").mkdir()
  with open(tmp_path / "cm" / "train.csv", "w", encoding="utf-8", newline="") as f:
    csv.writer(f).writerows(rows)
  datasets.build("cmexam", tmp_path / "cm", tmp_path / "tfds")
  c.task, c.data.seq_len = "sft", 256
  it, val = from_config.make_data(c, tiny_tok, log=lambda m: None)
  assert val is None and next(it)["loss_mask"].sum() > 0


def test_asset_path():
  assert asset_path("tinystories-260k/tokenizer.model").is_file()
  assert asset_path("cmexam_sample.csv").stat().st_size < 1_500_000
  with pytest.raises(DataError, match="nothing.bin"):
    asset_path("nothing.bin")
  qs, problems = cmexam.read_cmexam(asset_path("cmexam_sample.csv"))
  assert len(qs) == 1200 and problems == []
