"""Run configs (`configs/*.py` with `get_config()`): every field with its default and what
it accepts (`fields()`), loading with `--config.FIELD=VALUE` overrides (`load`), and one
check of every field before anything is built (`validate`). A run config is data: the data
layer builds its pipelines (`data.from_config`) and the loop its evals (`training.evals`)."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

import ml_collections

from medjax import inputs
from medjax.errors import ConfigError, MedjaxError
from medjax.inputs import DIR, FILE, FILE_OR_DIR, Bool, Choice, Float, Int, Path, Text
from medjax.model.config import ATTENTION, DTYPES, LORA_TARGETS, PRESETS, REMAT_POLICIES

MESH_SIZE = dict(ge=1, also=(-1,))  # a mesh axis: its size, or -1 for the remaining devices


def _rules(text: str) -> None:
  from medjax.parallel import sharding  # imports jax: not at module level
  sharding.parse_rules(text)


def _exam_task(text: str) -> None:
  from medjax.data import tasks  # the task files are read only when a config is checked
  tasks.load_task(text)


def _lora_targets(text: str) -> None:
  bad = sorted({t.strip() for t in text.split(",")} - set(LORA_TARGETS))
  if bad:
    raise ValueError(f"unknown projection(s) {', '.join(repr(b) for b in bad)}")


def fields() -> inputs.Fields:
  """Every run-config field: its default (CPU demo) and what it accepts, one per line.

  A new field is one line, `c.GROUP.NAME = Int(DEFAULT, ge=...)  # what it means`, with a
  spec from medjax.inputs (Int, Float, Bool, Choice, Text, Path); `validate` checks it.
  """
  c = inputs.Fields()
  c.task = Choice("cpt", ("cpt", "sft"))
  # The exam: SFT data and eval.cmexam are read, and prompts written, by this task
  # definition (medjax.data.tasks).
  c.exam = Text("cmexam", nonempty=True, check=_exam_task,
                what="a task name (cmexam, medqa_usmle, cmmlu:SUBJECT, ceval:SUBJECT) or a "
                "task .json file")
  c.model = Choice("tiny", PRESETS)  # preset, used when init_from is empty
  # HF dir, import-hf dir, or a previous workdir ("" = a random `model`)
  c.init_from = Path("asset:tinystories-260k", DIR, empty_ok=True)
  c.model_overrides = inputs.Fields()
  c.model_overrides.dtype = Choice("float32", DTYPES)  # compute dtype; weights stay f32
  c.model_overrides.scan_layers = Bool(True)
  c.model_overrides.remat = Choice("none", REMAT_POLICIES)
  c.model_overrides.attention = Choice("auto", ATTENTION)
  c.model_overrides.lora_rank = Int(0, ge=0)  # 0 = full fine-tuning
  c.model_overrides.lora_alpha = Float(16.0, gt=0)
  c.model_overrides.lora_targets = Text("q,k,v,o", nonempty=True, check=_lora_targets,
                                        what=f"names among {','.join(LORA_TARGETS)}")

  c.data = inputs.Fields()
  # comma-separated files/folders, or tfds:DIR (`medjax data build` output)
  c.data.train = Path("asset:medical_text_sample.csv", FILE_OR_DIR, many=True,
                      prefixed={"tfds:": DIR})
  c.data.columns = Text("title,ask,answer")  # CSV text columns ("" = defaults, see corpus.py)
  # general text mixed in against forgetting ("" = none)
  c.data.replay = Path("asset:tinystories_sample.txt", FILE_OR_DIR, many=True, empty_ok=True,
                       prefixed={"tfds:": DIR})
  c.data.replay_weight = Float(0.0, ge=0, lt=1)  # fraction of the trained tokens from `replay`
  c.data.val_fraction = Float(0.05, ge=0, lt=1)  # held out by a stable hash of each document
  c.data.seq_len = Int(256, ge=1)  # tokens per row
  # "" = the init checkpoint's tokenizer (tokenizer.model or tokenizer.json)
  c.data.tokenizer = Path("", FILE, empty_ok=True)
  c.data.with_explanation = Bool(False)  # SFT: train on "answer + explanation"

  c.batch_size = Int(16, ge=1)  # global, in sequences
  c.accum_steps = Int(1, ge=1)  # micro-batches per step (same update as one big batch)
  c.total_steps = Int(200, ge=1)
  c.log_every = Int(10, ge=1)
  c.checkpoint_every = Int(100, ge=1)
  c.keep_checkpoints = Int(2, ge=1)
  c.eval_every = Int(100, ge=0)  # validation loss (+ the evals below); 0 = off
  c.eval_batches = Int(4, ge=1)
  c.seed = Int(0, ge=0, lt=2**31)
  c.nan_policy = Choice("skip", ("skip", "stop"))  # on a non-finite loss or gradient
  c.frozen = Text("")  # comma-separated param path prefixes kept fixed, e.g. "embedding"

  c.optim = inputs.Fields()
  c.optim.lr = Float(3e-3, gt=0)  # peak learning rate
  c.optim.warmup_steps = Int(20, ge=0)
  c.optim.final_lr_ratio = Float(0.1, ge=0, le=1)  # cosine decay to lr * this
  c.optim.b1 = Float(0.9, ge=0, lt=1)
  c.optim.b2 = Float(0.95, ge=0, lt=1)
  c.optim.eps = Float(1e-8, gt=0)
  c.optim.weight_decay = Float(0.1, ge=0)
  c.optim.clip_norm = Float(1.0, ge=0)  # global gradient norm; 0 = off

  c.mesh = inputs.Fields()
  c.mesh.data = Int(1, **MESH_SIZE)
  c.mesh.fsdp = Int(-1, **MESH_SIZE)
  c.mesh.tensor = Int(1, **MESH_SIZE)
  # "" = medjax.parallel.sharding.DEFAULT_RULES; else "logical=axis+axis;..."
  c.rules = Text("", check=_rules, what='sharding rules "logical=axis+axis;..."')

  c.eval = inputs.Fields()
  # an exam CSV in `exam`'s schema scored at each eval ("" = off; logged as {task}_acc)
  c.eval.cmexam = Path("", FILE, empty_ok=True)
  c.eval.cmexam_limit = Int(40, ge=1)  # its first N held-out questions
  c.eval.text = Path("asset:tinystories_sample.txt", FILE_OR_DIR, empty_ok=True)  # perplexity
  c.eval.text_limit = Int(20, ge=1)  # its first N documents
  return c


FIELDS: dict[str, inputs.Spec] = fields().flat()


def base_config() -> ml_collections.ConfigDict:
  """Every field a run config has, with CPU-demo defaults; configs/*.py change what differs.
  What each field accepts: `fields()`."""
  return fields().defaults()


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` (its `get_config(arg)`) and applies `--config.a.b=value` overrides.

  A config file that does not load, an unknown field or a value of the wrong type is a
  ConfigError of one line naming the file (and line) or the field.
  """
  from absl import flags
  from ml_collections import config_flags
  path, sep, arg = spec.partition(":")
  problem = inputs.path_problem(path, FILE)
  if problem:
    raise ConfigError(f"{path}: config file not found" if problem == "no such file"
                      else f"{path}: config file {problem}")
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"unrecognized argument {bad[0]!r}; config fields are set with "
                      "--config.FIELD=VALUE")
  c = _get_config(path, arg if sep else None)
  for o in overrides:
    _check_override(o)
  argv = ["medjax", *overrides]
  fv = flags.FlagValues()
  try:
    # sys_argv: the override flags are defined from the argv given here, not sys.argv.
    config_flags.DEFINE_config_dict("config", c, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
  except flags.Error as e:
    raise ConfigError(f"{path}: {_clean(str(e))}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{path}: {_clean(str(e))}") from None
  return fv.config


def _check_override(override: str) -> None:
  """`--config.NAME=TEXT`: NAME is a field and TEXT parses as its type (absl's messages for
  these name neither the field's range nor a close spelling)."""
  name, eq, text = override[len("--config."):].partition("=")
  spec = FIELDS.get(name)
  if spec is None:
    near = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"; did you mean {near[0]}?" if near else " (fields: medjax.training.config.fields())"
    raise ConfigError(f"config.{name}: unknown field{hint}")
  if not eq:
    raise ConfigError(f"{override}: give a value as --config.{name}=VALUE "
                      f"({name} accepts {spec.accepts()})")
  try:
    spec.parse(text)
  except (ValueError, OverflowError):
    raise ConfigError(f"config.{name}={text!r}: accepts {spec.accepts()}") from None


def _get_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
  """Runs the file's `get_config(arg)`; any failure is one line: file, line, error."""
  name = f"_medjax_config_{abs(hash(os.path.abspath(path)))}"
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    spec.loader.exec_module(module)
    get = getattr(module, "get_config", None)
    if not callable(get):
      raise ConfigError(f"{path}: no get_config() function (a config file defines "
                        "get_config(arg=None) returning an ml_collections.ConfigDict)")
    c = get(arg) if arg is not None else get()
  except ConfigError as e:
    if str(e).startswith(path):
      raise
    raise ConfigError(_where(e, path)) from None
  except SyntaxError as e:
    where = f"{path}:{e.lineno}" if e.lineno else path
    raise ConfigError(f"{where}: SyntaxError: {e.msg}") from None
  except Exception as e:  # the config file's own code raised
    raise ConfigError(_where(e, path)) from None
  finally:
    sys.modules.pop(name, None)
  if not isinstance(c, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(c).__name__}, not an "
                      "ml_collections.ConfigDict")
  return c


def _where(e: BaseException, path: str) -> str:
  """'FILE:LINE: Type: message', LINE the deepest line of the config file in the traceback."""
  line, tb, real = None, e.__traceback__, os.path.realpath(path)
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == real:
      line = tb.tb_lineno
    tb = tb.tb_next
  msg = " ".join(str(e).split())[:300]
  kind = "" if isinstance(e, MedjaxError) else f"{type(e).__name__}: "
  return f"{path}:{line}: {kind}{msg}" if line else f"{path}: {kind}{msg}"


def _clean(msg: str) -> str:
  # ml_collections may embed a traceback; keep its last line.
  if "Traceback (most recent call last)" in msg:
    head = msg.split("Traceback", 1)[0]
    last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
    msg = f"{head} {last}"
  return " ".join(msg.split())[:400]


def _flatten(c, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def problems(c, paths: bool = True) -> list[str]:
  """Every way `c` breaks its declarations (`fields()`) or the relations between fields.

  Args:
    c: a run config.
    paths: also check that input paths exist (False where they are read elsewhere, e.g.
      `medjax fit` of a TPU recipe on a laptop).
  Returns:
    One line per problem, naming the field, the value and what is accepted.
  """
  flat = _flatten(c)
  out = [f"config.{k}={flat[k]!r}: unknown field (fields and defaults: "
         "medjax.training.config.fields())" for k in flat if k not in FIELDS]
  missing = [k for k in FIELDS if k not in flat]
  if missing:
    out.append(f"config: missing field(s) {', '.join(missing)} (build configs from "
               "medjax.training.config.base_config())")
  for k, spec in FIELDS.items():
    if k not in flat:
      continue
    v = flat[k]
    if isinstance(spec, Path) and not paths:
      p = None if isinstance(v, str) else f"accepts {spec.accepts()}"
    else:
      p = spec.problem(v)
    if p:
      out.append(f"config.{k}={v!r}: {p}")
  return out or list(_relations(c))


def _relations(c):
  """Checks between fields (each field is valid on its own by now)."""
  if c.batch_size % c.accum_steps:
    yield (f"config.batch_size={c.batch_size} must be divisible by "
           f"accum_steps={c.accum_steps}")
  sizes = {k: c.mesh[k] for k in ("data", "fsdp", "tensor")}
  if list(sizes.values()).count(-1) > 1:
    yield f"config.mesh={sizes}: at most one axis may be -1"
  if c.data.replay_weight > 0 and not c.data.replay.strip():
    yield (f"config.data.replay_weight={c.data.replay_weight}: data.replay is empty "
           "(set it, or replay_weight=0)")


def validate(c, paths: bool = True) -> None:
  """ConfigError naming the first problem (`problems`), before anything is built.

  Args:
    c: a run config.
    paths: also check that input paths exist and have the right kind.
  """
  found = problems(c, paths)
  if found:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise ConfigError(found[0] + more)


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
