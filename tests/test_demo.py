"""`medjax demo --quick` end to end, step reuse on a rerun, and `medjax.vocab` resizing."""

import json
import os
import time

import jax
import numpy as np
import pytest

from medjax import cli
from medjax.model import config
from medjax.model import llama as model
from medjax.checkpoints import vocab
from medjax.errors import CheckpointError


# ------------------------------------------------------------------------------ vocab


@pytest.mark.parametrize("tied", [True, False])
def test_resize_keeps_old_logits_and_means_new_rows(tied):
  cfg = config.preset("tiny-mha", tie_word_embeddings=tied)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  new, ncfg = vocab.resize_embeddings(params, cfg, cfg.vocab_size + 37)
  assert ncfg.vocab_size == cfg.vocab_size + 37
  emb = np.asarray(new["embedding"])
  assert emb.shape == (cfg.vocab_size + 37, cfg.hidden_size)
  np.testing.assert_allclose(emb[cfg.vocab_size:],
                             np.broadcast_to(np.asarray(params["embedding"]).mean(0),
                                             (37, cfg.hidden_size)), atol=1e-7)
  if not tied:
    head = np.asarray(new["lm_head"])
    np.testing.assert_allclose(head[:, cfg.vocab_size:], np.broadcast_to(
        np.asarray(params["lm_head"]).mean(1, keepdims=True), (cfg.hidden_size, 37)), atol=1e-7)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))  # old ids only
  before = np.asarray(model.forward(cfg, params, tokens))
  after = np.asarray(model.forward(ncfg, new, tokens))
  np.testing.assert_allclose(after[..., : cfg.vocab_size], before, atol=1e-5)


def test_resize_refuses_to_shrink():
  cfg = config.preset("tiny-mha")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(CheckpointError, match=r"301 to 300"):
    vocab.resize_embeddings(params, cfg, 300)
  same, scfg = vocab.resize_embeddings(params, cfg, 301)
  assert same is params and scfg == cfg


# ------------------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("demo") / "run"
  t = time.perf_counter()
  rc = cli.main(["demo", "--quick", "--workdir", str(wd)])
  return wd, rc, time.perf_counter() - t


def test_quick_demo(quick_run):
  wd, rc, secs = quick_run
  assert rc == 0
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["reference"] == "PASS"
  assert summary["cpt_lowered_medical_ppl"]
  assert summary["medical_ppl"]["cpt"] < summary["medical_ppl"]["base"]
  assert summary["vocab"]["tokens_per_char_after"] < summary["vocab"]["tokens_per_char_before"]
  rows = summary["eval"]["rows"]
  assert {"base (resized)", "CPT", "CPT + SFT"} <= set(rows)
  for r in rows.values():
    assert r["story"]  # every model produced a continuation
  report = (wd / "report.md").read_text()
  assert "loss_curves.png" in report and "| CPT |" in report
  assert os.path.getsize(wd / "loss_curves.png") > 1000
  # The report is `medjax report` of the CPT and SFT runs after the demo's own sections
  # (quick mode: validation loss is its only in-training eval).
  assert report.index("## Evaluation") < report.index("## Domain gain and forgetting")
  assert "| CPT | val_loss |" in report and "| SFT | val_loss |" in report
  assert (wd / "report.html").read_text().count("data:image/png;base64,") == 3
  assert (wd / "hf" / "config.json").exists() and (wd / "hf" / "tokenizer.model").exists()
  print(f"medjax demo --quick took {secs:.0f}s")


def test_quick_demo_export_loads_in_transformers(quick_run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  wd, rc, _ = quick_run
  assert rc == 0
  m = transformers.AutoModelForCausalLM.from_pretrained(str(wd / "hf"), dtype=torch.float32)
  summary = json.loads((wd / "summary.json").read_text())
  assert m.config.vocab_size == summary["vocab"]["vocab_size"]
  assert summary["export"]["max_logit_diff"] < 1e-3


def test_rerun_reuses_finished_steps(quick_run, capsys):
  wd, rc, first = quick_run
  assert rc == 0
  capsys.readouterr()
  t = time.perf_counter()
  assert cli.main(["demo", "--quick", "--workdir", str(wd)]) == 0
  secs = time.perf_counter() - t
  out = capsys.readouterr().out
  assert out.count("reusing") == 6, out
  assert secs < first / 3, (secs, first)
