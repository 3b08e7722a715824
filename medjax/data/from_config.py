"""The data a run config asks for: the training iterator and the validation source, from
corpus files, CMExam CSVs or `medjax data build` output (`tfds:DIR`), split by stable hash.
"""

from __future__ import annotations

from typing import Any

import jax

from medjax.assets import resolve
from medjax.data import cmexam, corpus, pipeline, tasks
from medjax.errors import DataError


def paths(spec: str) -> list[str]:
  """A comma-separated list of files/folders (`asset:NAME` allowed) -> paths."""
  return [resolve(p.strip()) for p in spec.split(",") if p.strip()]


def csv_columns(c):
  """data.columns as a tuple (None = the corpus reader's defaults)."""
  cols = c.data.get("columns", "")
  return tuple(x.strip() for x in cols.split(",") if x.strip()) or None


def _built_dataset(spec: str) -> str | None:
  """'tfds:DATA_DIR' (the --out of `medjax data build`) -> DATA_DIR; else None."""
  return spec[len("tfds:"):] if spec.startswith("tfds:") else None


def _optional_split(load) -> list:
  try:
    return load()
  except DataError as e:
    if "no split" not in str(e):
      raise
    return []


def make_data(c, tokenizer, log):
  """(train iterator, validation source) for the task; validation is held out by hash."""
  d = c.data
  kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  built = _built_dataset(d.train)
  if c.task == "cpt":
    if built:  # `medjax data build medical_text` output: its own train/validation splits
      from medjax.data import builders as datasets
      train = [corpus.Document(t, built) for t in datasets.load_texts(built, "train")]
      val = [corpus.Document(t, built)
             for t in _optional_split(lambda: datasets.load_texts(built, "validation"))]
    else:
      docs = corpus.read_documents(paths(d.train), csv_columns(c))
      train, val = corpus.split_documents(docs, d.val_fraction, c.seed)
    if not train:
      raise DataError(f"data.train {d.train}: no training documents after the split")
    source: Any = [x.text for x in train]
    if d.replay and d.replay_weight > 0:
      general = corpus.read_texts(paths(d.replay))
      source = [(source, 1.0 - d.replay_weight), (general, d.replay_weight)]
    log(f"data: {len(train)} train / {len(val)} validation documents from {d.train}"
        + (f", replay {d.replay_weight:.0%} from {d.replay}" if isinstance(source[0], tuple)
           else ""))
    it = pipeline.make_cpt_iterator(source, tokenizer, d.seq_len, c.batch_size, seed=c.seed,
                                    **kw)
    return it, ([x.text for x in val] or None)
  if built:  # `medjax data build cmexam` output: train split, validation split if built
    from medjax.data import builders as datasets
    train = datasets.load_questions(built, "train")
    val = _optional_split(lambda: datasets.load_questions(built, "validation"))
  else:
    questions, task = [], tasks.load_task(c.get("exam", ""))
    for p in paths(d.train):
      qs, problems = cmexam.read_cmexam(p, task)
      for pr in problems[:5]:
        log(f"warning: skipped {pr}")
      if problems:
        log(f"warning: {len(problems)} rows of {p} could not be parsed (listed above, first 5)")
      questions.extend(qs)
    train, val = split_questions(questions, d.val_fraction, c.seed)
  if not train:
    raise DataError(f"data.train {d.train}: no questions")
  log(f"data: {len(train)} SFT questions, {len(val)} held out for validation")
  it = pipeline.make_sft_iterator(train, tokenizer, d.seq_len, c.batch_size, seed=c.seed,
                                  with_explanation=d.with_explanation, **kw)
  return it, (val or None)


def split_questions(questions, val_fraction: float, seed: int):
  """(train, held out) by a stable hash of each question's text and options."""
  train, val = [], []
  for q in questions:
    key = q.question + "\n" + "\n".join(q.options.values())
    (val if corpus.is_validation(key, val_fraction, seed) else train).append(q)
  return train, val


def val_batches(c, val_source, tokenizer):
  """This process's share of the validation pass (`pipeline.eval_batches`)."""
  return pipeline.eval_batches(val_source, tokenizer, c.data.seq_len, c.batch_size,
                               kind=c.task, with_explanation=c.data.with_explanation,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
