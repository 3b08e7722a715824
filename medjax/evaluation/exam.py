"""Exam accuracy (CMExam, or any `medjax.data.tasks` exam): log-likelihood of candidate
answers (`scoring.score_rows`), or greedy generation with the answer letters extracted. The drivers take (cfg, params, tokenizer,
questions, batch_size) and return plain dicts, so the training loop calls them for periodic
evaluation as well as `medjax eval`.

Log-likelihood policy (`score_cmexam`). The prompt is `cmexam.format_prompt(q)` (the
question's task's convention), BOS + prompt tokens, and each candidate answer is tokenised
on its own (`encode(c, bos=False)`), exactly as SFT (`medjax.data.tokenize_sft`) joins prompt
and response. A task with a `target_delimiter` (the lm-evaluation-harness convention, target
" A") scores the tail of encode(prompt + " A") beyond encode(prompt) instead, as the harness.

- Single-answer question: the candidates are the option letters; a letter's score is the
  log-probability of its token(s) after the prompt. The highest wins.
- Multiple-answer question: the candidates are every letter set of size >= 2 of its options
  (26 for five options), written as sorted letters ("ABD"). A candidate's score is the total
  log-probability of its tokens plus the log-probability that the answer ends there (the
  next token is EOS, or the first token of the explanation cue ("\\n解析：") that follows the letters in SFT data
  with explanations). Without that end term "AB" would always beat "ABD" whenever "AB"
  tokenises as a prefix of "ABD", since log-probabilities only add negative terms.
- Like the chance baseline (`cmexam.chance_accuracy`), this uses the dataset's knowledge of
  whether a question is single- or multiple-answer; the `generate` method does not.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from medjax.data import cmexam
from medjax.data.tasks import ExamTask
from medjax.errors import MedjaxError
from medjax.evaluation import generate as generate_lib
from medjax.evaluation import scoring
from medjax.model.config import LlamaConfig

METHODS = ("loglik", "generate")


# ----------------------------------------------------------------------------- CMExam


def candidates(q: cmexam.Question) -> list[str]:
  """Answer strings scored for `q`: its letters, or all letter sets of size >= 2 if multi."""
  letters = list(q.options)
  if not q.is_multi:
    return letters
  return ["".join(c) for r in range(2, len(letters) + 1)
          for c in itertools.combinations(letters, r)]


def _fit_prompt(ids: list[int], room: int, keep: int) -> tuple[list[int], bool]:
  """Cuts a prompt from the left to `room` tokens, as SFT does (keeps the cue), keeping its
  first `keep` tokens (1: the BOS; 0 for tokenizers without one)."""
  if len(ids) <= room:
    return ids, False
  return ids[:keep] + ids[len(ids) - room + keep:], True


def _continuation(tokenizer, prompt: str, ctx: list[int], delimiter: str, text: str
                  ) -> list[int]:
  """The token ids scored for `text` after the prompt.

  No delimiter (medjax's convention): `text` tokenised on its own, as SFT joins prompt and
  response. With one (lm-evaluation-harness's, target " A"): the prompt and prompt +
  delimiter + text are encoded and the tail beyond the prompt's length is scored, as the
  harness's `_encode_pair` does.
  """
  if not delimiter:
    return tokenizer.encode(text, bos=False)
  return tokenizer.encode(prompt + delimiter + text, bos=True)[len(ctx):]


def score_cmexam(cfg: LlamaConfig, params, tokenizer, questions: Sequence[cmexam.Question],
                 batch_size: int = 16, max_len: int | None = None, progress: bool = False,
                 placement=None):
  """Log-likelihood of each candidate answer of each question (policy: module docstring).

  Args:
    cfg, params: the model.
    tokenizer: encode(text, bos, eos), eos_id.
    questions: the questions.
    batch_size: rows per forward pass.
    max_len: longest row; prompts are cut from the left to fit (default: the model's
      max_position_embeddings).
    progress: show a tqdm bar.
    placement: params on a mesh (`scoring.score_rows`); None: one device.

  Returns:
    (scores, truncated): per question a dict candidate -> total log-prob, and the number of
    prompts that were cut.
  """
  max_len = max_len or cfg.max_position_embeddings
  rows: dict[tuple, int] = {}
  gather: list[list[int]] = []
  plans = []  # per question: per candidate (row, token span, gathered slots)

  def row_of(ids: list[int]) -> int:
    key = tuple(ids)
    if key not in rows:
      rows[key] = len(rows)
      gather.append([])
    return rows[key]

  def slot(r: int, tid: int) -> int:
    if tid not in gather[r]:
      gather[r].append(tid)
    return gather[r].index(tid)

  truncated = 0
  for q in questions:
    cands = candidates(q)
    prompt = cmexam.format_prompt(q)
    full_ctx = tokenizer.encode(prompt, bos=True)
    cont_of = functools.partial(_continuation, tokenizer, prompt, full_ctx,
                                q.task.target_delimiter)
    conts = [cont_of(c) for c in cands]
    ctx, cut = _fit_prompt(full_ctx, max_len - max(len(c) for c in conts),
                           int(tokenizer.bos_id is not None))
    truncated += cut
    plan = []
    for c, cont in zip(cands, conts):
      if not q.is_multi and len(cont) == 1:
        # All single-token letters share one row: the distribution right after the prompt.
        r = row_of(ctx)
        plan.append((r, (0, 0), [slot(r, cont[0])]))
        continue
      r = row_of(ctx + cont)
      ends = []
      if q.is_multi:
        ends = [tokenizer.eos_id]
        ext = cont_of(c + q.task.explanation_cue)
        if ext[: len(cont)] == cont and len(ext) > len(cont):
          ends.append(ext[len(cont)])
      plan.append((r, (len(ctx), len(ctx) + len(cont)), [slot(r, e) for e in set(ends)]))
    plans.append((cands, plan))

  token_lp, next_lp = scoring.score_rows(cfg, params, list(rows), batch_size, gather,
                                         progress, desc="cmexam loglik", placement=placement)
  scores = []
  for cands, plan in plans:
    s = {}
    for c, (r, (a, b), slots) in zip(cands, plan):
      v = float(token_lp[r][a:b].sum())
      if slots:
        v += float(np.logaddexp.reduce(next_lp[r][slots]))
      s[c] = v
    scores.append(s)
  return scores, truncated


_CUE_RE = re.compile(r"(?:正确)?答案\s*(?:是|为|应为|应该是|应选)?\s*[:：]?")


def extract_answer(text: str, letters: str = "ABCDE", task: ExamTask | None = None
                   ) -> str | None:
  """The answer letters a generated text names, sorted ("BD"), or None if none.

  Looks after the task's answer cue or a Chinese "答案：" cue when there is one, else at the
  first non-empty line; stops at "解析" or the task's explanation cue (an explanation may
  name other options). A run of option letters, optionally separated by 、,，/ spaces or 和,
  counts when not part of a Latin word ("Answer: B" -> B).

  Args:
    text: the model's continuation of the prompt.
    letters: the question's option letters.
    task: the question's exam task (default CMExam).

  Returns:
    The sorted letter set, or None.
  """
  norm = lambda x: unicodedata.normalize("NFKC", x)  # full-width "ＡＢ" and "：" -> ASCII
  t = norm(text)
  cue = norm(task.answer_cue).strip() if task else ""
  if cue and cue in t:
    t = t[t.index(cue) + len(cue):]
  else:
    m = _CUE_RE.search(t)
    if m:
      t = t[m.end():]
  t = t.split("解析")[0]
  stop = norm(task.explanation_cue).strip() if task else ""
  if stop:
    t = t.split(stop)[0]
  lines = [ln for ln in t.splitlines() if ln.strip()]
  if not lines:
    return None
  cls = "[" + re.escape(letters) + "]"
  run = re.search(rf"(?<![A-Za-z])({cls}(?:[\s、,/和及与]*{cls})*)(?![A-Za-z])", lines[0])
  if not run:
    return None
  return "".join(sorted(set(c for c in run.group(1) if c in letters)))


def predict_generate(cfg: LlamaConfig, params, tokenizer, questions: Sequence[cmexam.Question],
                     batch_size: int = 16, max_new_tokens: int = 16,
                     max_len: int | None = None, progress: bool = False, placement=None):
  """Greedy continuations of each prompt. Returns (texts, truncated prompt count)."""
  max_len = max_len or cfg.max_position_embeddings
  prompts, truncated = [], 0
  for q in questions:
    ids, cut = _fit_prompt(tokenizer.encode(cmexam.format_prompt(q), bos=True),
                           max_len - max_new_tokens, int(tokenizer.bos_id is not None))
    prompts.append(ids)
    truncated += cut
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  texts: list = [None] * len(prompts)
  eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
  for start in tqdm(range(0, len(order), batch_size), desc="cmexam generate",
                    disable=not progress, unit="batch"):
    idx = order[start: start + batch_size]
    # Pad the last batch with copies so every call has the same batch shape (one compile).
    batch = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch_size - len(idx))
    new = generate_lib.generate(cfg, params, batch, max_new_tokens, eos_id=eos,
                                placement=placement)
    for i, ids in zip(idx, new):
      texts[i] = tokenizer.decode(ids)
  return texts, truncated


def _rate(correct: Sequence[bool], chance: Sequence[float]) -> dict:
  n = len(correct)
  return {"n": n, "accuracy": sum(correct) / n if n else None,
          "chance": sum(chance) / n if n else None}


def summarize(questions: Sequence[cmexam.Question], predictions: Sequence[str | None],
              method: str, problems: Sequence = (), truncated: int = 0) -> dict:
  """Accuracy report from predicted letter sets (None = answer could not be extracted).

  Exact-set match, as CMExam's own evaluation: "ABD" is right only for answer "ABD".
  `chance` is the mean over the questions of `cmexam.chance_accuracy`: 1/k for a
  single-answer question with k options, 1/(2**k - 1 - k) for a multiple-answer one.
  """
  correct = [p == q.answer for q, p in zip(questions, predictions)]
  chance = [cmexam.chance_accuracy(q) for q in questions]
  res = {"method": method, **_rate(correct, chance)}
  for name, multi in (("single", False), ("multi", True)):
    sel = [i for i, q in enumerate(questions) if q.is_multi == multi]
    res[name] = _rate([correct[i] for i in sel], [chance[i] for i in sel])
  bad_answers = [q.source for q, p in zip(questions, predictions) if p is None]
  res["unparsed"] = {"count": len(bad_answers) + len(problems), "answers": bad_answers,
                     "rows": [str(p) for p in problems]}
  res["truncated"] = truncated
  groups: dict = {}
  for i, q in enumerate(questions):
    for col, val in q.extra.items():
      groups.setdefault(col, {}).setdefault(val or "(empty)", []).append(i)
  res["groups"] = {col: {v: _rate([correct[i] for i in ix], [chance[i] for i in ix])
                         for v, ix in sorted(vals.items())}
                   for col, vals in groups.items()}
  return res


def evaluate_cmexam(cfg: LlamaConfig, params, tokenizer, questions: Sequence[cmexam.Question],
                    batch_size: int = 16, method: str = "loglik", problems: Sequence = (),
                    max_new_tokens: int = 16, max_len: int | None = None,
                    progress: bool = False, return_predictions: bool = False,
                    placement=None) -> dict:
  """CMExam accuracy of a model.

  Args:
    cfg, params: the model.
    tokenizer: a `medjax.Tokenizer`.
    questions: from `cmexam.read_cmexam`.
    batch_size: rows per forward pass.
    method: "loglik" (highest-likelihood candidate) or "generate" (greedy decoding, letters
      extracted with `extract_answer`).
    problems: CSV rows that could not be parsed; counted in `unparsed`.
    max_new_tokens: generation length for method="generate".
    max_len: longest sequence (default: the model's max_position_embeddings).
    progress: show a tqdm bar.
    return_predictions: add a per-question `predictions` list.
    placement: params on a mesh (`parallel.placement`); None: one device.

  Returns:
    A dict: method, n, accuracy, chance, single/multi {n, accuracy, chance}, unparsed
    {count, answers, rows}, truncated, groups {column: {value: {n, accuracy, chance}}}.
  """
  if method not in METHODS:
    raise MedjaxError(f"method {method!r}: expected one of {', '.join(METHODS)}")
  if not questions:
    raise MedjaxError("no CMExam questions to evaluate")
  if method == "loglik":
    scores, truncated = score_cmexam(cfg, params, tokenizer, questions, batch_size, max_len,
                                     progress, placement)
    preds = [max(s, key=s.get) for s in scores]  # ties: the first candidate
    outputs = preds
  else:
    outputs, truncated = predict_generate(cfg, params, tokenizer, questions, batch_size,
                                          max_new_tokens, max_len, progress, placement)
    preds = [extract_answer(t, q.letters, q.task) for q, t in zip(questions, outputs)]
  res = summarize(questions, preds, method, problems, truncated)
  if return_predictions:
    res["predictions"] = [{"source": q.source, "answer": q.answer, "predicted": p,
                           "output": o} for q, p, o in zip(questions, preds, outputs)]
  return res


def markdown_table(res: dict) -> str:
  """A Markdown table of a CMExam result: overall, single/multi, then each group."""
  def fmt(x):
    return "–" if x is None else f"{100 * x:.2f}"

  lines = ["| subset | n | accuracy % | chance % |", "|---|---:|---:|---:|"]
  lines.append(f"| all ({res['method']}) | {res['n']} | {fmt(res['accuracy'])} | "
               f"{fmt(res['chance'])} |")
  for name in ("single", "multi"):
    r = res[name]
    lines.append(f"| {name}-answer | {r['n']} | {fmt(r['accuracy'])} | {fmt(r['chance'])} |")
  for col, vals in res.get("groups", {}).items():
    for v, r in vals.items():
      lines.append(f"| {col}: {v} | {r['n']} | {fmt(r['accuracy'])} | {fmt(r['chance'])} |")
  lines.append(f"\nunparsed: {res['unparsed']['count']} "
               f"({len(res['unparsed']['answers'])} answers, "
               f"{len(res['unparsed']['rows'])} CSV rows); truncated prompts: "
               f"{res['truncated']}")
  return "\n".join(lines)
