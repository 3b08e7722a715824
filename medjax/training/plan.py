"""`medjax plan`: what a recipe will cost on a TPU slice, before launch.

For each run config of a recipe (e.g. CPT then SFT): does the step fit the slice (the same
ahead-of-time compile as `medjax fit`), how long a step takes at a given MFU (FLOPs per step,
6·N + attention per token as in `fit`, over the slice's bf16 peak times the MFU), and so the
tokens/s, wall-clock hours, chip-hours and cost of the config's steps, then the recipe's sum.
The tokens in the config's data (counted with its tokenizer, estimated from a sample's
tokens per byte for large corpora, read from a tokenized build's manifest, or given) say how
many epochs those steps are, or set the steps with `epochs`.

Hours scale as 1 / MFU and cost as the price: the MFU is an assumption (`DEFAULT_MFU`,
printed) or the median a previous run measured (`--from-run`). The command line is
`medjax.cli.plan`.
"""

from __future__ import annotations

import json
import math
import os

from medjax.errors import ConfigError, DataError
from medjax.training.fit import CHIPS, parse_topology

# Cloud TPU on-demand list prices, USD per chip-hour, in us-central1 / us-east5 (v4:
# us-central2). Read on PRICES_AS_OF from the SkyPilot GCP catalog (github.com/skypilot-org/
# skypilot-catalog, catalogs/v8/gcp/vms.csv at 006059e), which copies Google's billing SKUs;
# they are the prices Google has listed at cloud.google.com/tpu/pricing since each chip's
# launch (v4 2022, v5e and v5p 2023, v6e 2024). Not re-checked against Google's page in this
# session; other regions cost up to ~20% more; Spot and committed-use prices are lower.
PRICES = {"v4": 3.22, "v5e": 1.20, "v5p": 4.20, "v6e": 2.70}
PRICES_AS_OF = "2026-12-01"
PRICES_NOTE = ("on-demand list price, us-central1/us-east5 (v4: us-central2), as listed "
               f"{PRICES_AS_OF}; override with --price CHIP=USD")
DEFAULT_MFU = 0.35  # conservative for FSDP Llama training on TPU (MaxText reports 50-60%)
SAMPLE_BYTES = 64 << 20  # corpora larger than this are counted on a sample of this size


def price_table(overrides: list[str] | dict | None = None) -> dict[str, float]:
  """The shipped prices with `CHIP=USD` overrides applied.

  Raises:
    ConfigError: an unknown chip key or a price that is not a positive number.
  """
  out = dict(PRICES)
  items = overrides.items() if isinstance(overrides, dict) else (
      tuple(o.partition("=")[::2]) for o in overrides or ())
  for key, val in items:
    key = key.strip()
    if key not in PRICES:
      raise ConfigError(f"--price {key}={val}: unknown price key {key!r} (keys: "
                        f"{', '.join(PRICES)})")
    try:
      out[key] = float(val)
    except ValueError:
      out[key] = float("nan")
    if not out[key] > 0:
      raise ConfigError(f"--price {key}={val}: expected a positive price in USD per chip-hour")
  return out


def run_cost(flops_per_step: float, tokens_per_step: float, steps: int, chips: int,
             peak_flops: float, mfu: float, price: float) -> dict:
  """Time and money for `steps` steps on `chips` chips.

  Args:
    flops_per_step: model FLOPs of one optimizer step (forward + backward, all chips).
    tokens_per_step: tokens one step processes.
    steps: optimizer steps.
    chips: chips in the slice.
    peak_flops: one chip's peak FLOP/s.
    mfu: model FLOPs utilisation, (0, 1].
    price: USD per chip-hour.

  Returns:
    {step_s, tokens_per_s, wall_hours, chip_hours, cost}.
  """
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu {mfu}: expected a fraction in (0, 1]")
  step_s = flops_per_step / (chips * peak_flops * mfu)
  wall_h = steps * step_s / 3600
  return {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s, "wall_hours": wall_h,
          "chip_hours": wall_h * chips, "cost": wall_h * chips * price}


def measured_mfu(workdir: str) -> tuple[float, str]:
  """The median MFU a previous run logged, and a note saying where it comes from."""
  from medjax.training import report
  run = report.read_run(workdir)
  t = report.throughput(run)
  if not t["mfu"]:
    raise DataError(f"{os.path.join(workdir, 'metrics.jsonl')}: no MFU logged (the run has "
                    "not logged a training interval yet)")
  note = f"measured: median of {t['intervals']} logged intervals of {workdir}"
  if not t["all_tokens"]:
    note += (" (logged before medjax counted every processed token: its MFU counts "
             "loss-bearing tokens only, an understatement for SFT)")
  return t["mfu"], note


# ------------------------------------------------------------------------------ the model


def model_config(c):
  """The run's LlamaConfig: from init_from when it is here (HF dir, medjax checkpoint or
  workdir), else the `model` preset; with model_overrides. Returns (cfg, where from)."""
  from medjax.assets import resolve
  from medjax.checkpoints import hf_config, modeldir
  from medjax.model import config as config_lib
  from medjax.training import config as runconfig
  over = runconfig.model_overrides(c)
  # Priced as full training (6·N per token): a LoRA run skips the frozen base's weight
  # gradients, so for it this overstates the FLOPs, by up to a third.
  over.pop("lora_rank", None)
  src = resolve(c.init_from) if c.init_from else ""
  if src and os.path.exists(os.path.join(src, modeldir.MODEL_CONFIG)):
    return modeldir.load_config(src).replace(**over), f"{src}/{modeldir.MODEL_CONFIG}"
  if src and os.path.exists(os.path.join(src, "config.json")):
    return hf_config.load_hf_config(src).replace(**over), f"{src}/config.json"
  why = f"init_from {src} is not here" if src else "no init_from"
  return config_lib.preset(c.model, **over), f"preset {c.model!r} ({why})"


def tokenizer_path(c) -> str | None:
  from medjax.assets import resolve
  for p in (c.data.tokenizer, os.path.join(resolve(c.init_from), "tokenizer.model")
            if c.init_from else ""):
    if p and os.path.isfile(resolve(p)):
      return resolve(p)
  return None


# ------------------------------------------------------------------------------ the data


def data_tokens(c, sample_bytes: int = SAMPLE_BYTES) -> tuple[float | None, str, float | None]:
  """Tokens of the config's training split, how they were found, and one epoch's rows.

  CPT: BOS + text + EOS per training document, concat-packed, so an epoch is tokens /
  seq_len full rows. SFT: BOS + prompt + response + EOS per training question, truncated to
  seq_len as training truncates it, and "fit"-packed: rows carry padding, so an epoch is
  counted in rows, packed as training packs them. Validation documents/questions are left
  out as training leaves them out.

  Returns:
    (tokens, note, rows); tokens is None when they cannot be found here (the note says
    why); rows is None where an epoch is tokens / seq_len (CPT, or not countable here).
  """
  from medjax.data import from_config
  spec = c.data.train
  if spec.startswith("tfds:"):
    return _manifest_tokens(spec[len("tfds:"):])
  try:
    paths = from_config.paths(spec)
  except DataError as e:
    return None, f"data.train: {e}", None
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    return None, f"data.train {missing[0]} is not on this machine; pass --tokens", None
  tok_path = tokenizer_path(c)
  if tok_path is None:
    return None, "no tokenizer here (data.tokenizer / init_from); pass --tokens", None
  from medjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tok_path)
  if c.task == "sft":
    return _sft_tokens(c, paths, tok)
  return (*_cpt_tokens(c, paths, tok, sample_bytes), None)


def _cpt_tokens(c, paths, tok, sample_bytes: int):
  from medjax.data import corpus
  from medjax.data.from_config import csv_columns
  files = [f for p in paths for f in corpus.list_files(p)]
  total = sum(f.stat().st_size for f in files)
  read, tokens = 0, 0
  for f in files:
    docs = corpus.read_documents([f], csv_columns(c))
    train, _ = corpus.split_documents(docs, c.data.val_fraction, c.seed)
    tokens += sum(len(x) + 2 for x in tok.encode_batch([d.text for d in train], bos=False))
    read += f.stat().st_size
    if read >= sample_bytes and read < total:
      est = tokens / read * total
      return est, (f"estimated: {tokens:,} tokens in the first {read / 2**20:.0f} MiB of "
                   f"{total / 2**20:.0f} MiB ({len(files)} files), scaled by bytes")
  return float(tokens), f"counted with {tok.path.name} over {len(files)} file(s)"


def _sft_tokens(c, paths, tok):
  import numpy as np
  from medjax.data import cmexam, packing, tasks
  from medjax.data.from_config import split_questions
  task = tasks.load_task(c.get("exam", ""))
  qs = [q for p in paths for q in cmexam.read_cmexam(p, task)[0]]
  train, _ = split_questions(qs, c.data.val_fraction, c.seed)
  docs = packing.tokenize_sft(train, tok, int(c.data.seq_len), c.data.with_explanation)
  lengths = np.diff(docs.offsets)
  rows = len(packing.pack(lengths, int(c.data.seq_len), "fit")[1]) - 1
  return float(lengths.sum()), (f"counted with {tok.path.name}: {len(train):,} {task.name} "
                                f"questions in {rows:,} packed rows"), float(rows)


def _manifest_tokens(built: str):
  """Training tokens from a tokenized build's manifest.json, when the build has one."""
  path = os.path.join(built, "manifest.json")
  try:
    with open(path) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return None, f"{built}: no token manifest (a text build); pass --tokens", None
  for rec in (m.get("splits", {}).get("train"), m.get("train"), m):
    if isinstance(rec, dict):
      for key in ("tokens", "num_tokens"):
        if isinstance(rec.get(key), (int, float)):
          # An SFT build's rows are "fit"-packed at the run's length: an epoch is its rows.
          rows = rec.get("rows") if m.get("kind") == "sft" else None
          return (float(rec[key]), f"from {path}",
                  float(rows) if isinstance(rows, (int, float)) else None)
  return None, f"{path}: no train token count found; pass --tokens", None


# ------------------------------------------------------------------------------ a recipe


def plan_run(c, topology: str, mfu: float, price: float, tokens: float | None = None,
             epochs: float | None = None, fit: bool = True, cpu: bool = False) -> dict:
  """Prices one run config on `topology`.

  Args:
    c: a loaded run config (`training.config.load`).
    topology: "v5p:2x2x1" style.
    mfu: model FLOPs utilisation assumed for the step time.
    price: USD per chip-hour.
    tokens: training tokens in the data (None: found from the config's data).
    epochs: price this many passes over the data instead of `c.total_steps`.
    fit: compile the step for the slice (as `medjax fit`) to say whether it fits.
    cpu: compile for CPU stand-in devices instead of libtpu.

  Returns:
    A dict: the run's shape, data tokens and epochs, fit verdict, and `run_cost`'s figures.
  """
  from medjax.training import config as runconfig
  from medjax.training import fit as fit_lib
  chip_name, dims = parse_topology(topology)
  chips = math.prod(dims)
  cfg, model_src = model_config(c)
  seq, batch = int(c.data.seq_len), int(c.batch_size)
  tokens_per_step = seq * batch
  flops = cfg.flops_per_token(seq) * tokens_per_step
  note, rows = "given with --tokens", None
  if tokens is None:
    tokens, note, rows = data_tokens(c)
  elif c.task == "sft":
    note += (" (epochs assume full rows; \"fit\" packing pads SFT rows, so the real count "
             "is lower: give the data to have its rows counted)")
  # An epoch in processed tokens: full rows (CPT, concat-packed), or the packed rows (SFT).
  epoch_tokens = rows * seq if rows else tokens
  # CPT mixes replay rows in: only (1 - replay_weight) of each step is the domain corpus.
  share = 1.0 - (c.data.replay_weight if c.task == "cpt" and c.data.replay else 0.0)
  steps = int(c.total_steps)
  if epochs is not None:
    if not tokens:
      raise ConfigError(f"--epochs needs the data's tokens ({note})")
    steps = math.ceil(epochs * epoch_tokens / (tokens_per_step * share))
  out = {"task": c.task, "exam": c.get("exam", "cmexam"), "params": cfg.num_params(),
         "model": model_src, "seq_len": seq, "batch": batch, "steps": steps,
         "tokens_per_step": tokens_per_step, "flops_per_step": flops, "data_tokens": tokens,
         "data_rows": rows, "data_note": note,
         "epochs": tokens_per_step * steps * share / epoch_tokens if tokens else None,
         "chips": chips, "fits": None}
  if fit:
    r = fit_lib.fit_report(cfg, topology, seq, batch, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
                           runconfig.rules(c), accum_steps=int(c.accum_steps), cpu=cpu)
    out.update(fits=r["fits"], hbm_per_chip=r.get("total"), hbm=r["hbm"],
               fit_note=r["note"])
  out.update(run_cost(flops, tokens_per_step, steps, chips, CHIPS[chip_name].peak_bf16_flops,
                      mfu, price))
  return out


def total(rows: list[dict]) -> dict:
  """The recipe's sum: hours, chip-hours and cost add up (the runs go one after another)."""
  keys = ("wall_hours", "chip_hours", "cost", "steps")
  return {k: sum(r[k] for r in rows) for k in keys}


def format_plan(rows: list[dict], names: list[str], topology: str, mfu: float, mfu_note: str,
                price: float, price_note: str) -> str:
  """The plan as text: one line of settings, a table of runs and their sum."""
  chip, dims = parse_topology(topology)
  peak = CHIPS[chip].peak_bf16_flops
  lines = [(f"medjax plan: {topology} ({math.prod(dims)} chips; {chip} peak "
            f"{peak / 1e12:.0f} TFLOP/s bf16 per chip), ${price:.2f} per chip-hour "
            f"({price_note})"),
           f"  MFU {100 * mfu:.1f}% ({mfu_note}); hours scale as 1/MFU"]
  head = ["run", "task", "params", "fits", "steps", "batch x seq", "data tokens", "epochs",
          "step", "tokens/s", "wall h", "chip-h", "cost USD"]
  table = []
  for name, r in zip(names, rows):
    fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
    if r["fits"] is not None and r.get("hbm_per_chip"):
      fits += f" ({r['hbm_per_chip'] / 2**30:.1f}/{r['hbm'] / 2**30:.0f} GiB)"
    table.append([name, r["task"], _count(r["params"]), fits, f"{r['steps']:,}",
                  f"{r['batch']} x {r['seq_len']}", _count(r["data_tokens"]),
                  "-" if r["epochs"] is None else f"{r['epochs']:.3g}",
                  _secs(r["step_s"]), f"{r['tokens_per_s']:,.0f}", _num(r["wall_hours"]),
                  _num(r["chip_hours"]), _num(r["cost"])])
  t = total(rows)
  table.append(["total", "", "", "", f"{t['steps']:,}", "", "", "", "", "",
                _num(t["wall_hours"]), _num(t["chip_hours"]), _num(t["cost"])])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
  fmt = lambda row: "  " + "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                                     for i, (x, w) in enumerate(zip(row, widths)))
  lines += [fmt(head)] + [fmt(r) for r in table]
  for name, r in zip(names, rows):
    lines.append(f"  {name}: model {r['model']}; data tokens {r['data_note']}")
    if r.get("fit_note"):
      lines.append(f"  {name}: {r['fit_note']}")
  lines.append("  Step time = FLOPs per step (6·N + attention per token, full rows) / "
               "(chips x peak x MFU); excludes compilation, evals and checkpoint writes.")
  return "\n".join(lines)


def _count(n) -> str:
  if n is None:
    return "?"
  for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:.0f}"


def _num(x: float) -> str:
  """Hours and dollars: whole numbers when large, 3 significant digits when small."""
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _secs(s: float) -> str:
  return f"{s * 1e6:.3g} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"
