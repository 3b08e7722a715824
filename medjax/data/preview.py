"""Looking at the data: one packed row rendered as text with the loss mask visible
(`medjax data show`), and the CPT pipeline's throughput (`medjax data bench`)."""

from __future__ import annotations

import os
import time

import numpy as np

from medjax.data import corpus
from medjax.data.packing import tokenize_documents
from medjax.data.pipeline import make_cpt_iterator
from medjax.data.tokenizer import Tokenizer


def bench_data(source, tokenizer: Tokenizer, seq_len: int = 2048, batch_size: int = 8,
               num_batches: int = 200, num_threads: int = 2) -> dict:
  """Measures CPT pipeline throughput: one tokenization pass, then packed batches.

  Args:
    source: a CPT source (e.g. a corpus path).
    tokenizer: the tokenizer.
    seq_len, batch_size: batch shape.
    num_batches: batches to time (the source repeats as needed).
    num_threads: grain threads.

  Returns:
    {"tokenize_tokens_per_s", "pipeline_tokens_per_s", "num_tokens", ...}.
  """
  texts = corpus.read_texts(source) if isinstance(source, (str, os.PathLike)) else source
  t0 = time.perf_counter()
  docs = tokenize_documents(texts, tokenizer)
  t1 = time.perf_counter()
  it = make_cpt_iterator(docs, tokenizer, seq_len, batch_size, seed=0,
                         num_threads=num_threads)
  next(it)  # exclude thread start-up
  t2 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  t3 = time.perf_counter()
  return {"num_docs": docs.num_docs, "num_tokens": docs.num_tokens,
          "tokenize_s": round(t1 - t0, 3),
          "tokenize_tokens_per_s": round(docs.num_tokens / (t1 - t0)),
          "pipeline_tokens_per_s": round(num_batches * batch_size * seq_len / (t3 - t2)),
          "end_to_end_tokens_per_s": round(
              num_batches * batch_size * seq_len / (t3 - t2 + t1 - t0)),
          "seq_len": seq_len, "batch_size": batch_size, "num_batches": num_batches}


def render_row(batch: dict[str, np.ndarray], tokenizer: Tokenizer, row: int = 0) -> str:
  """Shows one row as text: each segment on its own line, untrained tokens in ⟦ ⟧.

  A token counts as trained when it is the target of a position with loss_mask 1, i.e.
  token i is trained iff loss_mask[i - 1] == 1 within its segment.
  """
  seg, ids, mask = batch["segment_ids"][row], batch["inputs"][row], batch["loss_mask"][row]
  out = []
  for s in sorted(set(seg.tolist()) - {0}):
    pos = np.flatnonzero(seg == s)
    trained = [False] + [bool(mask[p - 1]) for p in pos[1:]]
    groups, cur, flag = [], [], trained[0]
    for p, t in zip(pos, trained):
      if t != flag and cur:
        groups.append((flag, cur))
        cur = []
      flag = t
      cur.append(int(ids[p]))
    groups.append((flag, cur))
    text = "".join(_show(tokenizer, g) if t else f"⟦{_show(tokenizer, g)}⟧" for t, g in groups)
    out.append(f"[segment {s}, {len(pos)} tokens] {text}")
  pad = int((seg == 0).sum())
  if pad:
    out.append(f"[padding: {pad} tokens]")
  return "\n".join(out)


def _show(tokenizer: Tokenizer, ids: list[int]) -> str:
  # Make special tokens visible instead of silently skipping them as decode() does.
  parts, buf = [], []
  for i in ids:
    if i in (tokenizer.bos_id, tokenizer.eos_id):
      parts.append(tokenizer.decode(buf))
      parts.append("<s>" if i == tokenizer.bos_id else "</s>")
      buf = []
    else:
      buf.append(i)
  parts.append(tokenizer.decode(buf))
  return "".join(parts)
