"""Run configs (`configs/*.py` with `get_config()`): loading, overrides, checks, and the
pieces of a run they describe (data iterators, optimizer fields, sharding rules)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from medjax import config as config_lib
from medjax.errors import ConfigError, DataError

def base_config() -> ml_collections.ConfigDict:
  """Every field a run config has, with CPU-demo defaults; configs/*.py change what differs."""
  c = ml_collections.ConfigDict()
  c.task = "cpt"  # cpt | sft
  c.model = "tiny"  # preset, used when init_from is empty
  c.init_from = "asset:tinystories-260k"  # HF dir, import-hf dir, or a previous workdir
  c.model_overrides = ml_collections.ConfigDict(dict(
      dtype="float32", scan_layers=True, remat="none", attention="auto",
      lora_rank=0, lora_alpha=16.0, lora_targets="q,k,v,o"))

  c.data = ml_collections.ConfigDict()
  c.data.train = "asset:medical_text_sample.csv"  # comma-separated files/folders, or tfds:DIR
  c.data.columns = "title,ask,answer"  # CSV text columns ("" = defaults, see corpus.py)
  c.data.replay = "asset:tinystories_sample.txt"  # general text mixed in against forgetting
  c.data.replay_weight = 0.0  # fraction of rows drawn from `replay`
  c.data.val_fraction = 0.05  # held out by a stable hash of each document / question
  c.data.seq_len = 256
  c.data.tokenizer = ""  # "" = the init checkpoint's tokenizer.model
  c.data.with_explanation = False  # SFT: train on "answer + explanation"

  c.batch_size = 16  # global, in sequences
  c.accum_steps = 1  # micro-batches per step (same update as one big batch)
  c.total_steps = 200
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.eval_every = 100  # validation loss (+ the evals below); 0 = off
  c.eval_batches = 4
  c.seed = 0
  c.nan_policy = "skip"  # skip | stop, on a non-finite loss or gradient
  c.frozen = ""  # comma-separated param path prefixes kept fixed, e.g. "embedding"

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.rules = ""  # "" = medjax.sharding.DEFAULT_RULES; else "logical=axis+axis;..."
  c.eval = ml_collections.ConfigDict(dict(
      cmexam="", cmexam_limit=40, text="asset:tinystories_sample.txt", text_limit=20))
  return c


REQUIRED = ("task", "total_steps", "log_every", "checkpoint_every", "seed", "batch_size",
            "mesh", "data", "optim")


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` and applies `--config.a.b=value` overrides (absl/ml_collections).

  An unknown field or a value of the wrong type is an error naming it.
  """
  from absl import flags
  from ml_collections import config_flags
  path = spec.split(":", 1)[0]
  if not os.path.exists(path):
    raise ConfigError(f"{path}: config file not found")
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"unrecognized argument {bad[0]!r}; config fields are set with "
                      "--config.FIELD=VALUE")
  argv = ["medjax", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  try:
    # sys_argv: the override flags are defined from the argv given here, not sys.argv.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
  except flags.Error as e:
    raise ConfigError(f"{path}: {_clean(str(e))}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{path}: {_clean(str(e))}") from None
  c = fv.config
  if not isinstance(c, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return c


def _clean(msg: str) -> str:
  # A config file that raised: ml_collections embeds the traceback; keep its last line.
  if "Traceback (most recent call last)" in msg:
    head = msg.split("Traceback", 1)[0]
    last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
    msg = f"{head} {last}"
  return " ".join(msg.split())[:400]


def validate(c) -> None:
  missing = [f for f in REQUIRED if f not in c]
  if missing:
    raise ConfigError(f"config: missing field(s) {', '.join(missing)}")
  if c.task not in ("cpt", "sft"):
    raise ConfigError(f"config.task={c.task!r}: expected 'cpt' or 'sft'")
  for f in ("total_steps", "log_every", "checkpoint_every", "batch_size", "accum_steps"):
    if int(c.get(f, 1)) <= 0:
      raise ConfigError(f"config.{f}={c.get(f)}: must be positive")
  if c.nan_policy not in ("skip", "stop"):
    raise ConfigError(f"config.nan_policy={c.nan_policy!r}: expected 'skip' or 'stop'")


def resolve(path: str) -> str:
  """'asset:NAME' -> the sample shipped in medjax/assets; other paths unchanged."""
  if path.startswith("asset:"):
    from medjax.data import asset_path
    return str(asset_path(path[len("asset:"):]))
  return path


def paths(spec: str) -> list[str]:
  return [resolve(p.strip()) for p in spec.split(",") if p.strip()]


def model_overrides(c) -> dict[str, Any]:
  o = dict(c.get("model_overrides", {}))
  if isinstance(o.get("lora_targets"), str):
    o["lora_targets"] = tuple(t.strip() for t in o["lora_targets"].split(",") if t.strip())
  return o


def optim(c) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict(c.optim.to_dict())
  o.total_steps = c.total_steps
  return o


def rules(c):
  """Logical->mesh rules: `c.rules` as 'embed=fsdp;heads=tensor;batch=data+fsdp' overrides
  the defaults entry by entry ('' = defaults; 'name=' = replicated)."""
  from medjax import sharding
  try:
    return sharding.parse_rules(c.get("rules", "") or "")
  except ConfigError as e:
    raise ConfigError(f"config.{e}") from None


def _columns(c):
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
  import jax
  from medjax import cmexam, corpus, data
  d = c.data
  kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  built = _built_dataset(d.train)
  if c.task == "cpt":
    if built:  # `medjax data build medical_text` output: its own train/validation splits
      from medjax import datasets
      train = [corpus.Document(t, built) for t in datasets.load_texts(built, "train")]
      val = [corpus.Document(t, built)
             for t in _optional_split(lambda: datasets.load_texts(built, "validation"))]
    else:
      docs = corpus.read_documents(paths(d.train), _columns(c))
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
    it = data.make_cpt_iterator(source, tokenizer, d.seq_len, c.batch_size, seed=c.seed, **kw)
    return it, ([x.text for x in val] or None)
  if built:  # `medjax data build cmexam` output: train split, validation split if built
    from medjax import datasets
    train = datasets.load_questions(built, "train")
    val = _optional_split(lambda: datasets.load_questions(built, "validation"))
  else:
    questions = []
    for p in paths(d.train):
      qs, problems = cmexam.read_cmexam(p)
      for pr in problems[:5]:
        log(f"warning: skipped {pr}")
      if problems:
        log(f"warning: {len(problems)} rows of {p} could not be parsed (listed above, first 5)")
      questions.extend(qs)
    train, val = split_questions(questions, d.val_fraction, c.seed)
  if not train:
    raise DataError(f"data.train {d.train}: no questions")
  log(f"data: {len(train)} SFT questions, {len(val)} held out for validation")
  it = data.make_sft_iterator(train, tokenizer, d.seq_len, c.batch_size, seed=c.seed,
                              with_explanation=d.with_explanation, **kw)
  return it, (val or None)


def split_questions(questions, val_fraction: float, seed: int):
  """(train, held out) by a stable hash of each question's text and options."""
  from medjax import corpus
  train, val = [], []
  for q in questions:
    key = q.question + "\n" + "\n".join(q.options.values())
    (val if corpus.is_validation(key, val_fraction, seed) else train).append(q)
  return train, val


def val_batches(c, val_source, tokenizer):
  import jax
  from medjax import data
  return data.eval_batches(val_source, tokenizer, c.data.seq_len, c.batch_size, kind=c.task,
                           with_explanation=c.data.with_explanation,
                           process_index=jax.process_index(), process_count=jax.process_count())


def extra_evals(c, cfg, params, tokenizer) -> dict:
  """CMExam accuracy on a small subset and general-text perplexity, when configured."""
  out = {}
  e = c.get("eval")
  if not e:
    return out
  from medjax import evaluate
  if e.get("cmexam"):
    from medjax import cmexam
    path = resolve(e.cmexam)
    qs, _ = cmexam.read_cmexam(path)
    if c.task == "sft" and path in paths(c.data.train):
      qs = split_questions(qs, c.data.val_fraction, c.seed)[1]  # never score trained questions
    r = evaluate.evaluate_cmexam(cfg, params, tokenizer, qs[: e.cmexam_limit], method="loglik",
                                 progress=False)
    out["cmexam_acc"] = r["accuracy"]
  if e.get("text"):
    from medjax import corpus
    texts = corpus.read_texts(resolve(e.text))[: e.text_limit]
    r = evaluate.perplexity(cfg, params, tokenizer, texts, max_len=c.data.seq_len,
                            progress=False)
    out["general_ppl"] = r["perplexity"]
  return out


def save_run_files(c, cfg: config_lib.LlamaConfig, tokenizer: str, workdir: str) -> None:
  """The resolved config, model config and tokenizer, so the workdir is a loadable model."""
  import jax
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "run_config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=1, default=str)
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  dst = os.path.join(workdir, "tokenizer.model")
  if os.path.abspath(tokenizer) != os.path.abspath(dst):
    shutil.copyfile(tokenizer, dst)
