"""Evaluations run during training, as a run config's `eval` block asks: CMExam accuracy on
held-out questions and general-text perplexity (forgetting), beside the validation loss."""

from __future__ import annotations

from medjax.assets import resolve
from medjax.data import cmexam, corpus
from medjax.data.from_config import paths, split_questions
from medjax.evaluation import exam, scoring


def extra_evals(c, cfg, params, tokenizer, placement=None) -> dict:
  """CMExam accuracy on a small subset and general-text perplexity, when configured;
  `placement`: the training mesh the params live on (every process computes the same)."""
  out = {}
  e = c.get("eval")
  if not e:
    return out
  if e.get("cmexam"):
    path = resolve(e.cmexam)
    qs, _ = cmexam.read_cmexam(path)
    if c.task == "sft" and path in paths(c.data.train):
      qs = split_questions(qs, c.data.val_fraction, c.seed)[1]  # never score trained questions
    r = exam.evaluate_cmexam(cfg, params, tokenizer, qs[: e.cmexam_limit], method="loglik",
                             progress=False, placement=placement)
    out["cmexam_acc"] = r["accuracy"]
  if e.get("text"):
    texts = corpus.read_texts(resolve(e.text))[: e.text_limit]
    r = scoring.perplexity(cfg, params, tokenizer, texts, max_len=c.data.seq_len,
                           progress=False, placement=placement)
    out["general_ppl"] = r["perplexity"]
  return out


