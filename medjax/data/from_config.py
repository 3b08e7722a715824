"""The data a run config asks for: the training iterator and the validation source, from
corpus files, CMExam CSVs or `medjax data build` output (`tfds:DIR`): a tokenized build
(`--tokenizer`, read by random access, checked against the run's tokenizer) when DIR holds
one, else the text datasets. Raw files are split by stable hash.
"""

from __future__ import annotations

from medjax.assets import resolve
from medjax.data import cmexam, corpus, pipeline, tasks, tokenized
from medjax.errors import DataError
from medjax.parallel import distributed


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


def _open_built(spec: str, name: str, c, tokenizer, log):
  """(train rows, validation rows or None) of a tokenized build named by 'tfds:DIR', or
  None when DIR holds no tokenized build of `name` (then the text datasets are read)."""
  data_dir = _built_dataset(spec)
  root = tokenized.find(data_dir, name) if data_dir else None
  if root is None:
    return None
  b = tokenized.Build(root)
  b.check_tokenizer(tokenizer)  # ids from another tokenizer would train on wrong tokens
  if name == "cmexam" and b.manifest.get("with_explanation") != c.data.with_explanation:
    raise DataError(f"{b.path}: built with with_explanation="
                    f"{b.manifest.get('with_explanation')}, but data.with_explanation="
                    f"{c.data.with_explanation}; rebuild or change the config")
  train = b.rows("train", c.data.seq_len, tokenizer.pad_id)
  val = b.rows("validation", c.data.seq_len, tokenizer.pad_id) if b.has("validation") else None
  info = b.manifest["splits"]
  log(f"data: {spec} tokenized build: {info['train']['tokens']:,} train tokens in "
      f"{len(train):,} rows" + (f", {info['validation']['tokens']:,} validation tokens"
                                if val is not None else ", no validation split"))
  return train, val


def make_data(c, tokenizer, log, rows: slice | None = None):
  """(train iterator, validation source) for the task; validation is held out by hash.

  Args:
    c: the run config.
    tokenizer: the run's tokenizer.
    log: prints a line (process 0).
    rows: the rows of each global batch this process reads (`distributed.process_slice`
      of the batch sharding); None = an even split by process index.

  Returns:
    (a `pipeline.GlobalBatches`, validation rows / texts / questions or None).
  """
  d = c.data
  if not 0 <= d.replay_weight < 1:
    raise DataError(f"data.replay_weight={d.replay_weight}: must be in [0, 1) (a fraction of "
                    "the trained tokens)")
  kw = dict(rows=rows if rows is not None else distributed.process_slice(c.batch_size))
  built = _built_dataset(d.train)
  opened = _open_built(d.train, "medical_text" if c.task == "cpt" else "cmexam", c,
                       tokenizer, log)
  if c.task == "cpt":
    if opened:
      source, val = opened
    elif built:  # `medjax data build medical_text` text output: its train/validation splits
      from medjax.data import builders as datasets
      source = datasets.load_texts(built, "train")
      val = _optional_split(lambda: datasets.load_texts(built, "validation"))
    else:
      docs = corpus.read_documents(paths(d.train), csv_columns(c))
      train, held = corpus.split_documents(docs, d.val_fraction, c.seed)
      source, val = [x.text for x in train], [x.text for x in held]
    if not len(source):
      raise DataError(f"data.train {d.train}: no training documents after the split")
    if not opened:
      log(f"data: {len(source)} train / {len(val)} validation documents from {d.train}, "
          "tokenized at start (for large corpora, tokenize once: `medjax data build "
          "medical_text --tokenizer`)")
    if d.replay and d.replay_weight > 0:
      general = _open_built(d.replay, "medical_text", c, tokenizer, log)
      general = general[0] if general else corpus.read_texts(paths(d.replay))
      source = [(source, 1.0 - d.replay_weight, "train"), (general, d.replay_weight, "replay")]
      log(f"data: replay {d.replay_weight:.0%} of the trained tokens from {d.replay}")
    it = pipeline.make_cpt_iterator(source, tokenizer, d.seq_len, c.batch_size, seed=c.seed,
                                    **kw)
    return it, (val if val is not None and len(val) else None)
  if opened:
    train, val = opened
  elif built:  # `medjax data build cmexam` output: train split, validation split if built
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
  if not len(train):
    raise DataError(f"data.train {d.train}: no questions")
  if not opened:
    log(f"data: {len(train)} SFT questions, {len(val)} held out for validation")
  it = pipeline.make_sft_iterator(train, tokenizer, d.seq_len, c.batch_size, seed=c.seed,
                                  with_explanation=d.with_explanation, **kw)
  return it, (val if val is not None and len(val) else None)


def split_questions(questions, val_fraction: float, seed: int):
  """(train, held out) by a stable hash of each question's text and options."""
  train, val = [], []
  for q in questions:
    key = q.question + "\n" + "\n".join(q.options.values())
    (val if corpus.is_validation(key, val_fraction, seed) else train).append(q)
  return train, val


def val_batches(c, val_source, tokenizer, rows: slice | None = None):
  """This process's rows of each batch of the validation pass (`pipeline.eval_batches`)."""
  return pipeline.eval_batches(val_source, tokenizer, c.data.seq_len, c.batch_size,
                               kind=c.task, with_explanation=c.data.with_explanation,
                               rows=rows if rows is not None else
                               distributed.process_slice(c.batch_size))
