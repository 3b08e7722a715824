"""`medjax plan`: a recipe's fit, step time, hours and cost on a TPU slice (`training.plan`).

  medjax plan --config configs/llama2_7b_cpt.py --config configs/llama2_7b_sft.py \\
      --topology v5p:2x2x1 --tokens 1e9 --tokens - --cpt.accum_steps=16 --sft.accum_steps=4
"""

from __future__ import annotations

import math

from medjax.cli.args import path
from medjax.errors import ConfigError
from medjax.inputs import DIR, FILE, Float, Text


def _topology(text: str) -> None:
  from medjax.training.fit import parse_topology
  parse_topology(text)


def _price(text: str) -> None:
  chip, eq, usd = text.partition("=")
  if not eq or not chip.strip() or not 0 < float(usd) < math.inf:
    raise ValueError(f"{text!r} is not CHIP=USD with a price above 0")


def _number_or_dash(text: str) -> None:
  if text != "-" and not 0 < float(text) < math.inf:
    raise ValueError(f"{text!r} is not a finite number above 0 or '-'")


def add_args(p):
  path(p, "--config", kind=FILE, with_arg=True, action="append", required=True,
       metavar="FILE[:ARG]", help="a run config; repeat for a recipe (e.g. CPT then SFT), "
       "priced in turn and summed")
  p.add_argument("--topology", required=True, type=Text(check=_topology, what="CHIP:AxB[xC]"),
                 help="TPU slice, e.g. v5p:2x2x1, v5e:4x4")
  p.add_argument("--mfu", type=Float(gt=0, le=1), help="model FLOPs utilisation for the step "
                 "time (default 0.35, stated in the output)")
  path(p, "--from-run", kind=DIR, metavar="WORKDIR",
       help="use the median MFU a previous run logged in its metrics.jsonl")
  p.add_argument("--price-per-chip-hour", type=Float(gt=0), metavar="USD",
                 help="price of this slice's chip (default: the shipped list price)")
  p.add_argument("--price", action="append", default=[], metavar="CHIP=USD",
                 type=Text(check=_price, what="CHIP=USD"),
                 help="override an entry of the shipped price table (v4, v5e, v5p, v6e)")
  p.add_argument("--tokens", action="append", default=[], metavar="N",
                 type=Text(check=_number_or_dash, what="a token count or '-'"),
                 help="training tokens in a config's data, one per --config in order ('-' = "
                 "count them from the config's data)")
  p.add_argument("--epochs", action="append", default=[], metavar="E",
                 type=Text(check=_number_or_dash, what="a number of passes or '-'"),
                 help="price E passes over the data instead of total_steps, one per --config "
                 "('-' = the config's total_steps)")
  p.add_argument("--no-fit", dest="fit", action="store_false",
                 help="skip the ahead-of-time compile (no FITS verdict; seconds, not minutes)")
  p.add_argument("--cpu", action="store_true", help="compile for CPU devices, not libtpu")
  p.epilog = ("Config fields are overridden with --config.FIELD=VALUE (every config), "
              "--cpt.FIELD=VALUE or --sft.FIELD=VALUE (the configs of that task), e.g. "
              "--cpt.accum_steps=16. Exit status 3 when a run does not fit the slice.")
  p.set_defaults(_accepts_rest=True)


def _per_config(values: list[str], n: int, flag: str) -> list:
  """One value per config, '-' meaning none."""
  if not values:
    return [None] * n
  if len(values) != n:
    raise ConfigError(f"{flag}: give one value per --config ({n}), '-' for none; got "
                      f"{len(values)}")
  out = []
  for v in values:
    try:
      out.append(None if v == "-" else float(v))
    except ValueError:
      raise ConfigError(f"{flag} {v!r}: expected a number or '-'") from None
  return out


def _load_configs(specs: list[str], rest: list[str]):
  from medjax.training import config as runconfig
  bad = [o for o in rest if not o.startswith(("--config.", "--cpt.", "--sft."))]
  if bad:
    raise ConfigError(f"unrecognized argument {bad[0]!r}; fields are set with "
                      "--config.FIELD=VALUE, --cpt.FIELD=VALUE or --sft.FIELD=VALUE")
  out = []
  for spec in specs:
    task = runconfig.load(spec).task
    mine = [o for o in rest if o.startswith("--config.")] + [
        "--config." + o.split(".", 1)[1] for o in rest if o.startswith(f"--{task}.")]
    c = runconfig.load(spec, mine)
    # A recipe is priced before its bucket exists: a base or data not on this machine
    # is a preset and --tokens (`plan.model_config`, `plan.data_tokens` say so).
    runconfig.validate(c, paths=False)
    out.append(c)
  return out


def run(args):
  from medjax.cli.fit import cpu_devices_for
  from medjax.training import plan
  from medjax.training.fit import parse_topology
  chip, _ = parse_topology(args.topology)
  prices = plan.price_table(args.price)
  price, price_note = prices[chip], plan.PRICES_NOTE
  if args.price_per_chip_hour is not None:
    price, price_note = plan.price_table({chip: args.price_per_chip_hour})[chip], "given"
  elif any(p.partition("=")[0].strip() == chip for p in args.price):
    price_note = "given with --price"
  if args.from_run:
    if args.mfu is not None:
      raise ConfigError("--mfu and --from-run: give one")
    mfu, mfu_note = plan.measured_mfu(args.from_run)
  else:
    mfu = plan.DEFAULT_MFU if args.mfu is None else args.mfu
    mfu_note = ("assumed: a conservative figure for FSDP training on TPU; --mfu or --from-run "
                "to change it") if args.mfu is None else "given"
    if not 0 < mfu <= 1:
      raise ConfigError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
  configs = _load_configs(args.config, args.rest)
  tokens = _per_config(args.tokens, len(configs), "--tokens")
  epochs = _per_config(args.epochs, len(configs), "--epochs")
  if args.fit:
    cpu_devices_for(args.topology)
  rows = [plan.plan_run(c, args.topology, mfu, price, t, e, fit=args.fit, cpu=args.cpu)
          for c, t, e in zip(configs, tokens, epochs)]
  names = [spec.split(":", 1)[0].rsplit("/", 1)[-1].removesuffix(".py") for spec in args.config]
  print(plan.format_plan(rows, names, args.topology, mfu, mfu_note, price, price_note))
  return 3 if any(r["fits"] is False for r in rows) else 0
