"""Evaluation: CMExam accuracy (log-likelihood or generation) and perplexity on plain text.

The heavy parts are pure jitted functions of (cfg, params, arrays); the drivers take
(cfg, params, tokenizer, questions-or-texts, batch_size) and return plain dicts, so the
training loop can call them for periodic evaluation as well as `medjax eval`.

Batches are RIGHT padded (pad segment id 0, positions 0..L-1 as without padding) to a fixed
[batch_size, power-of-two length] shape: a row's scores do not depend on its batch-mates or
its padding, and each length bucket compiles once.

CMExam log-likelihood policy (`score_cmexam`). The prompt is `cmexam.format_prompt(q)`, BOS +
prompt tokens, and each candidate answer is tokenised on its own (`encode(c, bos=False)`),
exactly as SFT (`medjax.data.tokenize_sft`) joins prompt and response.

- Single-answer question: the candidates are the option letters; a letter's score is the
  log-probability of its token(s) after the prompt. The highest wins.
- Multiple-answer question: the candidates are every letter set of size >= 2 of its options
  (26 for five options), written as sorted letters ("ABD"). A candidate's score is the total
  log-probability of its tokens plus the log-probability that the answer ends there (the
  next token is EOS, or the first token of "\\n解析：" that follows the letters in SFT data
  with explanations). Without that end term "AB" would always beat "ABD" whenever "AB"
  tokenises as a prefix of "ABD", since log-probabilities only add negative terms.
- Like the chance baseline (`cmexam.chance_accuracy`), this uses the dataset's knowledge of
  whether a question is single- or multiple-answer; the `generate` method does not.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import unicodedata
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medjax import cmexam
from medjax import generate as generate_lib
from medjax import model as model_lib
from medjax.config import LlamaConfig
from medjax.errors import MedjaxError

METHODS = ("loglik", "generate")


# ----------------------------------------------------------------------------- jitted core


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(cfg: LlamaConfig, params, tokens, segment_ids, positions):
  """Log-probability of each token given the tokens before it in its segment.

  Args:
    cfg: model config (static).
    params: model params.
    tokens: [B,T] int32.
    segment_ids: [B,T] int32, 0 on padding.
    positions: [B,T] int32 RoPE positions.

  Returns:
    [B,T] float32; entry t is log p(tokens[t] | tokens[:t]), entry 0 is 0. Entries on
    padding or at a segment's first token are meaningless; mask them.
  """
  lp, _ = _score_batch(cfg, params, tokens, segment_ids, positions,
                       jnp.zeros(tokens.shape[:1], jnp.int32),
                       jnp.zeros((tokens.shape[0], 1), jnp.int32))
  return lp


def _score_batch(cfg, params, tokens, segment_ids, positions, last_idx, gather_ids):
  """Token log-probs [B,T], plus next-token log-probs [B,K] of `gather_ids` after last_idx."""
  logits = model_lib.forward(cfg, params, tokens, positions=positions,
                             segment_ids=segment_ids)  # [B,T,V] f32
  # logsumexp + gather instead of a full log_softmax: never a second [B,T,V] array.
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B,T]
  tgt = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [B,T-1]
  lp = jnp.pad(tgt - lse[:, :-1], ((0, 0), (1, 0)))  # [B,T]
  last = jnp.take_along_axis(logits, last_idx[:, None, None], axis=1)[:, 0]  # [B,V]
  last_lse = jnp.take_along_axis(lse, last_idx[:, None], axis=1)  # [B,1]
  nxt = jnp.take_along_axis(last, gather_ids, axis=-1) - last_lse  # [B,K]
  return lp, nxt


_score_batch_jit = jax.jit(_score_batch, static_argnames=("cfg",))


def score_rows(cfg: LlamaConfig, params, rows: Sequence[Sequence[int]], batch_size: int,
               gather: Sequence[Sequence[int]] | None = None, progress: bool = False,
               desc: str = "scoring"):
  """Scores token rows in fixed-shape batches.

  Args:
    cfg, params: the model.
    rows: N non-empty token lists (BOS included by the caller).
    batch_size: rows per forward pass.
    gather: optional per-row token ids whose log-probability as the NEXT token after the
      row's last token is returned.
    progress: show a tqdm bar.
    desc: the bar's label.

  Returns:
    (token_lp, next_lp): N float64 arrays [len(row)] as in `token_logprobs`, and N arrays
    [len(gather[i])] (empty when gather is None).
  """
  if batch_size < 1:
    raise MedjaxError(f"batch_size={batch_size} must be >= 1")
  gather = gather or [[] for _ in rows]
  k = max([1] + [len(g) for g in gather])
  # Longest first, so rows of similar length share a bucket and padding stays small.
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  token_lp: list = [None] * len(rows)
  next_lp: list = [None] * len(rows)
  for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                    unit="batch"):
    idx = order[start: start + batch_size]
    t = generate_lib.bucket_length(len(rows[idx[0]]))
    tokens = np.zeros((batch_size, t), np.int32)
    seg = np.zeros((batch_size, t), np.int32)
    last = np.zeros((batch_size,), np.int32)
    ids = np.zeros((batch_size, k), np.int32)
    for j, i in enumerate(idx):
      n = len(rows[i])
      tokens[j, :n], seg[j, :n], last[j] = rows[i], 1, n - 1
      ids[j, : len(gather[i])] = gather[i]
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t))
    # Explicit transfers: training runs with jax_transfer_guard="disallow".
    lp, nxt = _score_batch_jit(cfg, params, *jax.device_put((tokens, seg, pos, last, ids)))
    lp, nxt = jax.device_get((lp, nxt))
    for j, i in enumerate(idx):
      token_lp[i] = lp[j, : len(rows[i])].astype(np.float64)
      next_lp[i] = nxt[j, : len(gather[i])].astype(np.float64)
  return token_lp, next_lp


# ----------------------------------------------------------------------------- CMExam


def candidates(q: cmexam.Question) -> list[str]:
  """Answer strings scored for `q`: its letters, or all letter sets of size >= 2 if multi."""
  letters = list(q.options)
  if not q.is_multi:
    return letters
  return ["".join(c) for r in range(2, len(letters) + 1)
          for c in itertools.combinations(letters, r)]


def _fit_prompt(ids: list[int], room: int) -> tuple[list[int], bool]:
  """Cuts a BOS-first prompt from the left to `room` tokens, as SFT does (keeps the cue)."""
  if len(ids) <= room:
    return ids, False
  return ids[:1] + ids[len(ids) - room + 1:], True


def score_cmexam(cfg: LlamaConfig, params, tokenizer, questions: Sequence[cmexam.Question],
                 batch_size: int = 16, max_len: int | None = None, progress: bool = False):
  """Log-likelihood of each candidate answer of each question (policy: module docstring).

  Args:
    cfg, params: the model.
    tokenizer: encode(text, bos, eos), eos_id.
    questions: the questions.
    batch_size: rows per forward pass.
    max_len: longest row; prompts are cut from the left to fit (default: the model's
      max_position_embeddings).
    progress: show a tqdm bar.

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
    conts = [tokenizer.encode(c, bos=False) for c in cands]
    ctx, cut = _fit_prompt(tokenizer.encode(cmexam.format_prompt(q), bos=True),
                           max_len - max(len(c) for c in conts))
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
        ext = tokenizer.encode(c + cmexam.EXPLANATION_CUE, bos=False)
        if ext[: len(cont)] == cont and len(ext) > len(cont):
          ends.append(ext[len(cont)])
      plan.append((r, (len(ctx), len(ctx) + len(cont)), [slot(r, e) for e in set(ends)]))
    plans.append((cands, plan))

  token_lp, next_lp = score_rows(cfg, params, list(rows), batch_size, gather, progress,
                                 desc="cmexam loglik")
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


def extract_answer(text: str, letters: str = "ABCDE") -> str | None:
  """The answer letters a generated text names, sorted ("BD"), or None if none.

  Looks after an "答案：" cue when there is one, else at the first non-empty line; stops at
  "解析" (an explanation may name other options). A run of option letters, optionally
  separated by 、,，/ spaces or 和, counts when not part of a Latin word ("Answer: B" -> B).

  Args:
    text: the model's continuation of the prompt.
    letters: the question's option letters.

  Returns:
    The sorted letter set, or None.
  """
  t = unicodedata.normalize("NFKC", text)  # full-width "ＡＢ" and "：" -> ASCII
  m = _CUE_RE.search(t)
  if m:
    t = t[m.end():]
  t = t.split("解析")[0]
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
                     max_len: int | None = None, progress: bool = False):
  """Greedy continuations of each prompt. Returns (texts, truncated prompt count)."""
  max_len = max_len or cfg.max_position_embeddings
  prompts, truncated = [], 0
  for q in questions:
    ids, cut = _fit_prompt(tokenizer.encode(cmexam.format_prompt(q), bos=True),
                           max_len - max_new_tokens)
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
    new = generate_lib.generate(cfg, params, batch, max_new_tokens, eos_id=eos)
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
                    progress: bool = False, return_predictions: bool = False) -> dict:
  """CMExam accuracy of a model.

  Args:
    cfg, params: the model.
    tokenizer: a `medjax.tokenizer.Tokenizer`.
    questions: from `cmexam.read_cmexam`.
    batch_size: rows per forward pass.
    method: "loglik" (highest-likelihood candidate) or "generate" (greedy decoding, letters
      extracted with `extract_answer`).
    problems: CSV rows that could not be parsed; counted in `unparsed`.
    max_new_tokens: generation length for method="generate".
    max_len: longest sequence (default: the model's max_position_embeddings).
    progress: show a tqdm bar.
    return_predictions: add a per-question `predictions` list.

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
                                     progress)
    preds = [max(s, key=s.get) for s in scores]  # ties: the first candidate
    outputs = preds
  else:
    outputs, truncated = predict_generate(cfg, params, tokenizer, questions, batch_size,
                                          max_new_tokens, max_len, progress)
    preds = [extract_answer(t, q.letters) for q, t in zip(questions, outputs)]
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


# ----------------------------------------------------------------------------- perplexity


def perplexity(cfg: LlamaConfig, params, tokenizer, texts: Sequence[str], batch_size: int = 8,
               max_len: int | None = None, progress: bool = False) -> dict:
  """Mean next-token NLL and perplexity over documents.

  Each document is tokenised as BOS + text + EOS, as training does
  (`medjax.data.tokenize_documents`). A document longer than `max_len` is cut into windows
  of `max_len` tokens that overlap by one token, so every token after BOS is predicted
  exactly once (with at most max_len - 1 tokens of context).

  Args:
    cfg, params: the model.
    tokenizer: encode(text, bos, eos).
    texts: the documents.
    batch_size: windows per forward pass.
    max_len: window length (default: the model's max_position_embeddings).
    progress: show a tqdm bar.

  Returns:
    {documents, windows, tokens (predicted tokens), nll (mean, nats), perplexity, max_len}.
  """
  max_len = max_len or cfg.max_position_embeddings
  if max_len < 2:
    raise MedjaxError(f"max_len={max_len} must be >= 2")
  windows = []
  for text in texts:
    ids = tokenizer.encode(text, bos=True, eos=True)
    start = 0
    while True:
      windows.append(ids[start: start + max_len])
      if start + max_len >= len(ids):
        break
      start += max_len - 1
  if not windows:
    raise MedjaxError("perplexity: no documents")
  token_lp, _ = score_rows(cfg, params, windows, batch_size, progress=progress,
                           desc="perplexity")
  n = sum(len(w) - 1 for w in windows)
  nll = -sum(float(lp[1:].sum()) for lp in token_lp) / max(n, 1)
  return {"documents": len(texts), "windows": len(windows), "tokens": n, "nll": nll,
          "perplexity": math.exp(nll), "max_len": max_len}
