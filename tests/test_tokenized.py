"""Tokenized builds: the rows equal in-memory packing, manifests, tokenizer and file checks,
random access per process, token-weighted mixtures, resume on another process count."""

import json

import numpy as np
import pytest

from medjax.assets import asset_path
from medjax.data import build_tokenized, cmexam, corpus, from_config, overlap, packing
from medjax.data import pipeline, tokenized
from medjax.errors import DataError

T = 32


def _corpus(d, n=160):
  """Two files (txt, jsonl) of distinct documents of varied length."""
  d.mkdir()
  rng = np.random.default_rng(0)
  words = ["发热", "咳嗽", "胸痛", "patient", "fever", "heart", "blood", "3天", "，", "。"]
  texts = ["".join(rng.choice(words, rng.integers(2, 40))) + f"病例{i}" for i in range(n)]
  (d / "a.txt").write_text("\n\n".join(texts[:n // 2]), encoding="utf-8")
  (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                       for t in texts[n // 2:]), encoding="utf-8")
  return texts


@pytest.fixture(scope="module")
def tok():
  """The shipped 512-piece TinyStories tokenizer."""
  from medjax.data.tokenizer import Tokenizer
  return Tokenizer(asset_path("tinystories-260k/tokenizer.model"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
  """A medical_text build (rows of 2T) of a small corpus, made with 2 worker processes."""
  root = tmp_path_factory.mktemp("tokenized")
  texts = _corpus(root / "in")
  notes = []
  path, manifest = build_tokenized.build_text(root / "in", root / "out", tok, seq_len=2 * T,
                                              val_fraction=0.1, workers=2, log=notes.append)
  assert notes == [] and manifest["workers"] == 2  # the worker processes did start
  return {"root": root, "path": path, "manifest": manifest, "texts": texts}


def _rows_equal(a, b):
  assert len(a) == len(b)
  for i in range(len(a)):
    for k in packing.FIELDS:
      np.testing.assert_array_equal(a[i][k], b[i][k], err_msg=f"row {i} {k}")


def test_build_rows_equal_in_memory_packing(built, tok):
  m, texts = built["manifest"], built["texts"]
  assert m["tokenizer"]["sha256"] == tokenized.fingerprint(tok.path)
  assert m["validation_split"]["fraction"] == 0.1 and m["dtype"] == "uint16"
  train, val = corpus.split_documents(texts, 0.1, seed=0)
  b = tokenized.Build(built["path"])
  for split, docs in (("train", train), ("validation", val)):
    ids = packing.tokenize_documents(docs, tok)
    info = m["splits"][split]
    assert (info["documents"], info["tokens"]) == (len(docs), ids.num_tokens)
    # Per source: the two files' counts add up to the split's.
    assert sum(s[split]["documents"] for s in m["sources"].values()) == len(docs)
    assert sum(s[split]["tokens"] for s in m["sources"].values()) == ids.num_tokens
    for seq_len in (2 * T, T):  # a run may read any divisor of the stored row length
      ref = packing.PackedRows(ids, seq_len, "concat", tok.pad_id)
      rows = b.rows(split, seq_len, tok.pad_id)
      _rows_equal(ref, rows)
      assert rows.trained_tokens == ref.trained_tokens == ids.num_tokens - ids.num_docs
  assert set(m["sources"]) == {"a.txt", "b.jsonl"}
  with pytest.raises(DataError, match="must divide the build's row length 64"):
    b.rows("train", 48, 0)


def test_sft_build_equals_fit_packing(tmp_path, tok):
  qs, _ = cmexam.read_cmexam(asset_path("cmexam_sample.csv"))
  path, m, problems = build_tokenized.build_cmexam(asset_path("cmexam_sample.csv"), tmp_path,
                                                   tok, 512, with_explanation=True)
  assert problems == [] and list(m["splits"]) == ["validation"]  # the file name decides
  qs = qs[:300]
  docs = packing.tokenize_sft(qs, tok, 512, with_explanation=True)
  ref = packing.PackedRows(docs, 512, "fit", tok.pad_id)
  rows = tokenized.Build(path).rows("validation", 512, tok.pad_id)
  assert m["splits"]["validation"]["documents"] == 1200
  # The first rows hold the first 300 questions (fit packing keeps the order).
  n = len(ref) - 1
  _rows_equal([ref[i] for i in range(n)], [rows[i] for i in range(n)])
  assert ref.trained_tokens == sum(float(ref[i]["loss_mask"].sum()) for i in range(len(ref)))
  with pytest.raises(DataError, match="must equal the build's row length 512"):
    tokenized.Build(path).rows("validation", 256, 0)


def _config(train, seq_len=T, batch=4):
  from medjax.training import config as runconfig
  c = runconfig.base_config()
  c.task, c.batch_size, c.data.seq_len, c.data.train = "cpt", batch, seq_len, train
  c.data.replay_weight = 0.0
  return c


def test_training_data_from_build_and_tokenizer_check(built, tok, tmp_path):
  c = _config(f"tfds:{built['root'] / 'out'}")
  it, val = from_config.make_data(c, tok, log=lambda m: None)
  assert isinstance(val, tokenized.BuiltRows) and next(it)["inputs"].shape == (4, T)
  # A manifest from another tokenizer: refused, both fingerprints named.
  import shutil
  other = tmp_path / "out"
  shutil.copytree(built["root"] / "out", other)
  mf = other / "medical_text" / "tokenized" / "manifest.json"
  m = json.loads(mf.read_text())
  m["tokenizer"]["sha256"] = "ab" * 32
  mf.write_text(json.dumps(m))
  want = tokenized.fingerprint(tok.path)[:16]
  with pytest.raises(DataError, match=f"sha256 abababababababab .* has sha256 {want}"):
    from_config.make_data(_config(f"tfds:{other}"), tok, log=lambda m: None)


class _Recorder:
  """Rows that remember which indices were read."""

  def __init__(self, rows):
    self.rows, self.read = rows, set()
    self.trained_tokens = rows.trained_tokens

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    self.read.add(int(i))
    return self.rows[i]


def test_each_process_reads_only_its_rows(built):
  b = tokenized.Build(built["path"])
  B, steps = 8, 5
  whole = pipeline.make_iterator(b.rows("train", T, 0), B, seed=3)
  want = [next(whole)["inputs"] for _ in range(steps)]
  reads = []
  for p in range(2):
    rec = _Recorder(b.rows("train", T, 0))
    it = pipeline.make_iterator(rec, B, seed=3, rows=slice(4 * p, 4 * p + 4), num_threads=1)
    for s in range(steps):
      np.testing.assert_array_equal(next(it)["inputs"], want[s][4 * p:4 * p + 4])
    reads.append(rec.read)
  # Disjoint reads (prefetching reads ahead, but only this process's rows of later batches).
  assert reads[0] and reads[1] and not reads[0] & reads[1]
  assert len(reads[0]) < len(b.rows("train", T, 0)) // 2


def test_mixture_is_weighted_by_tokens(tok):
  full = packing.TokenizedDocs.from_lists([[1] + [7] * (4 * T) + [2]] * 20)  # ~T per row
  short = packing.TokenizedDocs.from_lists([[1, 9, 9, 9, 2]] * 400)  # 4 per row
  a = packing.PackedRows(full, T, "concat", 0)
  b = packing.PackedRows(short, T, "single", 0)
  it = pipeline.make_iterator([(a, 0.5, "full"), (b, 0.5, "short")], batch_size=16, seed=0)
  rows_from_b = 0
  for _ in range(40):
    batch = next(it)
    rows_from_b += int((batch["inputs"] == 9).any(axis=1).sum())
  from medjax.training import metrics
  counts = it.take_source_tokens()
  assert it.source_names == ("full", "short")
  frac = counts / counts.sum()
  assert abs(frac[1] - 0.5) < 0.02, frac  # half of the trained tokens...
  assert rows_from_b / 640 > 0.85  # ...from ~8x as many rows of the short source
  assert it.take_source_tokens().sum() == 0  # counts since the last call
  next(it)
  mix = metrics.mixture_fractions(it)  # what the training log shows
  assert set(mix) == {"mix/full", "mix/short"} and abs(sum(mix.values()) - 1) < 1e-9


def _global(its, n):
  """n global batches assembled from per-process iterators (rows in process order)."""
  out = []
  for _ in range(n):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in packing.FIELDS})
  return out


def test_elastic_resume_2x4_1x8_4x2(built, tok):
  """Checkpointed as 2 processes, resumed as 1, then as 4: the same global batches as an
  uninterrupted run, for a build mixed with replay text (what a CPT run reads)."""
  general = corpus.read_texts(asset_path("tinystories_sample.txt"))[:40]
  B = 8

  def make(procs):
    c = _config(f"tfds:{built['root'] / 'out'}", batch=B)
    c.data.replay, c.data.replay_weight = "asset:tinystories_sample.txt", 0.25
    return [pipeline.make_cpt_iterator(
        [(tokenized.Build(built["path"]).rows("train", T, 0), 0.75, "train"),
         (general, 0.25, "replay")], tok, T, B, seed=1,
        rows=slice(p * B // procs, (p + 1) * B // procs)) for p in range(procs)]

  want = _global(make(1), 9)
  state = None
  got = []
  for procs in (2, 1, 4):  # 2x4 devices, then 1x8, then 4x2
    its = make(procs)
    if state is not None:
      for it in its:
        it.set_state(json.loads(json.dumps(state)))  # as saved in the checkpoint (JSON)
    got += _global(its, 3)
    states = [it.get_state() for it in its]
    assert all(s == states[0] for s in states)  # one global position, whichever process
    state = states[0]
  assert state["global_batch"] == 9
  for w, g in zip(want, got):
    for k in packing.FIELDS:
      np.testing.assert_array_equal(w[k], g[k])
  # Another global batch size continues at the same sample.
  it = pipeline.make_iterator(tokenized.Build(built["path"]).rows("train", T, 0), 4, seed=2)
  it.set_state({"global_sample": 24, "global_batch": 3, "batch_size": 8})
  assert it.get_state()["global_batch"] == 6


def test_overlap_on_build_matches_raw_files(built, tok, tmp_path):
  q = built["texts"][5][:20]  # a planted "exam question" taken from a training document
  evals = [q, "完全无关的问题：高血压的饮食禁忌有哪些呢"]
  raw = overlap.ngram_overlap(evals, corpus.iter_documents(built["root"] / "in"), n=8)
  b = tokenized.Build(built["path"])
  split = "validation" if built["texts"][5] in corpus.split_documents(
      built["texts"], 0.1)[1] else "train"
  got = overlap.build_overlap(evals, b.iter_documents(split), tok.decode, n=8)
  assert set(raw.hits) == set(got.hits) == {0} and got.hits[0] == raw.hits[0]
  assert got.tokens > 0 and got.example[0][1].startswith(f"{split} row ")


def test_overlap_cli_on_build(built, capsys):
  from medjax import cli
  assert cli.main(["data", "overlap", "--build", f"tfds:{built['root'] / 'out'}", "--eval",
                   str(asset_path("cmexam_sample.csv"))]) == 0
  out = capsys.readouterr().out
  tokens = built["manifest"]["splits"]["train"]["tokens"]
  assert "0 of 1200 eval questions share a 13-character n-gram" in out
  assert f"({tokens:,} tokens, " in out and "tokens/s" in out


def test_bad_builds_fail_before_training(built, tok, tmp_path):
  import shutil
  out = tmp_path / "out"
  shutil.copytree(built["root"] / "out", out)
  d = out / "medical_text" / "tokenized"
  f = d / "train-00000.array_record"
  data = f.read_bytes()
  make = lambda: from_config.make_data(_config(f"tfds:{out}"), tok, log=lambda m: None)
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=r"train-00000.array_record: \d+ bytes, the manifest"):
    make()
  f.write_bytes(data[:40] + bytes(len(data) - 40))  # same size, first record zeroed
  with pytest.raises(DataError,
                     match=r"train-00000.array_record: (record 0|not a readable|0 records)"):
    make()
  f.unlink()
  with pytest.raises(DataError, match="train-00000.array_record: missing"):
    make()
  m = json.loads((d / "manifest.json").read_text())
  del m["splits"]["train"]
  (d / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(DataError, match="no split 'train'"):
    make()
