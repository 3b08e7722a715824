"""Evaluations run during training, as a run config's `eval` block asks: exam accuracy on
held-out questions (`eval.cmexam`, read with the run's exam task `c.exam`; logged as
`{task}_acc`, e.g. `cmexam_acc`) and general-text perplexity (`general_ppl`, forgetting),
beside the validation loss."""

from __future__ import annotations

from medjax.assets import resolve
from medjax.data import cmexam, corpus, tasks
from medjax.data.from_config import paths, split_questions
from medjax.evaluation import exam, scoring


def check(c) -> None:
  """Reads `eval.cmexam` with the run's exam task once, so a task naming columns the file
  lacks stops the run before it starts, not at its first eval."""
  e = c.get("eval")
  if e and e.get("cmexam"):
    cmexam.read_cmexam(resolve(e.cmexam), tasks.load_task(c.get("exam", "")))


def extra_evals(c, cfg, params, tokenizer, placement=None) -> dict:
  """Exam accuracy on a small subset and general-text perplexity, when configured;
  `placement`: the training mesh the params live on (every process computes the same)."""
  out = {}
  e = c.get("eval")
  if not e:
    return out
  if e.get("cmexam"):
    path = resolve(e.cmexam)
    task = tasks.load_task(c.get("exam", ""))
    qs, _ = cmexam.read_cmexam(path, task)
    if c.task == "sft" and path in paths(c.data.train):
      qs = split_questions(qs, c.data.val_fraction, c.seed)[1]  # never score trained questions
    r = exam.evaluate_cmexam(cfg, params, tokenizer, qs[: e.cmexam_limit], method="loglik",
                             progress=False, placement=placement)
    out[f"{task.name}_acc"] = r["accuracy"]
  if e.get("text"):
    texts = corpus.read_texts(resolve(e.text))[: e.text_limit]
    r = scoring.perplexity(cfg, params, tokenizer, texts, max_len=c.data.seq_len,
                           progress=False, placement=placement)
    out["general_ppl"] = r["perplexity"]
  return out


