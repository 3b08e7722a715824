"""Run configs (`configs/*.py` with `get_config()`): every field and its default, loading
with `--config.FIELD=VALUE` overrides, and checking. A run config is data: the data layer
builds its pipelines (`data.from_config`) and the loop its evals (`training.evals`)."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from medjax.errors import ConfigError

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
  # Comma-separated files/folders (tokenized at start), or tfds:DIR (`medjax data build`;
  # a tokenized build there is read by random access and must match the run's tokenizer).
  c.data.train = "asset:medical_text_sample.csv"
  c.data.columns = "title,ask,answer"  # CSV text columns ("" = defaults, see corpus.py)
  c.data.replay = "asset:tinystories_sample.txt"  # general text against forgetting, as train
  c.data.replay_weight = 0.0  # in [0, 1): fraction of the trained tokens from `replay`
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
  c.rules = ""  # "" = medjax.parallel.sharding.DEFAULT_RULES; else "logical=axis+axis;..."
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
  from medjax.parallel import sharding
  try:
    return sharding.parse_rules(c.get("rules", "") or "")
  except ConfigError as e:
    raise ConfigError(f"config.{e}") from None
