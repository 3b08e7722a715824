"""`medjax fit`: will a training run fit a TPU slice? (`training.fit` does the compile.)

  medjax fit --model llama2-7b --seq-len 4096 --batch-per-device 1 --topology v5p:2x2x1
"""

from __future__ import annotations

import math
import os

from medjax.cli.args import path
from medjax.inputs import FILE, Choice, Int, Ints, Text
from medjax.model.config import ATTENTION, DTYPES, PRESETS, REMAT_POLICIES


def _topology(text: str) -> None:
  from medjax.training.fit import parse_topology
  parse_topology(text)


def _rules(text: str) -> None:
  from medjax.parallel.sharding import parse_rules
  parse_rules(text)


def add_args(p):
  p.add_argument("--topology", required=True, type=Text(check=_topology, what="CHIP:AxB[xC]"),
                 help="TPU slice, e.g. v5p:2x2x1, v5e:2x4, v4:2x2x2")
  path(p, "--config", kind=FILE, with_arg=True,
       help="training config file[:arg] (reads model, model_overrides, data.seq_len, "
            "batch_size, mesh, rules, accum_steps); flags override it")
  p.add_argument("--model", type=Choice(options=PRESETS), help="model preset (default llama2-7b)")
  p.add_argument("--seq-len", type=Int(ge=1))
  p.add_argument("--batch-per-device", type=Int(ge=1), help="rows per chip (default 1)")
  p.add_argument("--mesh", type=Ints(count=3, ge=1, also=(-1,)),
                 help="data,fsdp,tensor sizes, one may be -1 (default 1,-1,1)")
  p.add_argument("--remat", choices=REMAT_POLICIES, help="what each layer keeps for the "
                 "backward pass (default full; offload keeps layer inputs in host memory)")
  p.add_argument("--attention", choices=ATTENTION,
                 help="default auto: the splash kernel on TPU, einsum for CPU estimates")
  p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default bfloat16)")
  p.add_argument("--no-scan", dest="scan", action="store_false", default=None,
                 help="unrolled layers (slower to compile)")
  p.add_argument("--accum-steps", type=Int(ge=1))
  p.add_argument("--rules", type=Text(check=_rules, what='sharding rules "logical=axis+axis;..."'),
                 help="sharding rule overrides, e.g. 'embed=;mlp=tensor'")
  p.add_argument("--cpu", action="store_true", help="compile for CPU devices, not libtpu")
  p.add_argument("--job", choices=("train", "eval", "generate"), default="train",
                 help="the program to check: the train step (default), `medjax eval`'s "
                      "scoring pass (rows of --seq-len), or `medjax generate`'s decode loop "
                      "(prompts of --seq-len)")
  p.add_argument("--max-new-tokens", type=Int(ge=1), default=256, help="for --job generate")


def _read_config(spec: str) -> dict:
  """Fields `fit` uses from a run config (checked, except that its data paths may not exist
  on this machine)."""
  from medjax.training import config as runconfig
  c = runconfig.load(spec)
  runconfig.validate(c, paths=False)
  out = {"model": c.model, "overrides": runconfig.model_overrides(c),
         "seq_len": c.data.seq_len, "global_batch": c.batch_size, "rules": c.rules,
         "accum_steps": c.accum_steps, "mesh": (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)}
  return {k: v for k, v in out.items() if v not in (None, "")}


def cpu_devices_for(topology: str) -> None:
  """Room for a CPU estimate of `topology`: as many CPU devices as chips. Must run before
  jax starts its CPU backend."""
  from medjax.training.fit import parse_topology
  _, dims = parse_topology(topology)
  if not os.environ.get("XLA_FLAGS", "").count("device_count"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={math.prod(dims)}"
                               ).strip()


def run(args):
  from medjax.model import config as config_lib
  from medjax.training.fit import fit_report, format_report, parse_topology
  chip, dims = parse_topology(args.topology)
  n = math.prod(dims)
  cpu_devices_for(args.topology)
  c = _read_config(args.config) if args.config else {}
  overrides = dict(c.get("overrides", {}))
  overrides.setdefault("dtype", "bfloat16")
  overrides.setdefault("scan_layers", True)
  overrides.setdefault("remat", "full")
  overrides.setdefault("attention", "auto")
  for flag, field in (("dtype", "dtype"), ("remat", "remat"), ("scan", "scan_layers"),
                      ("attention", "attention")):
    if getattr(args, flag) is not None:
      overrides[field] = getattr(args, flag)
  cfg = config_lib.preset(args.model or c.get("model", "llama2-7b"), **overrides)
  mesh = args.mesh or c.get("mesh", (1, -1, 1))
  seq = args.seq_len or c.get("seq_len", 4096)
  batch = (args.batch_per_device or 1) * n if args.batch_per_device or "global_batch" not in c \
      else c["global_batch"]
  if args.job != "train":
    from medjax.evaluation.fit import eval_fit_report, format_eval_report
    r = eval_fit_report(cfg, args.topology, seq, batch, mesh, args.rules or c.get("rules"),
                        job=args.job, max_new_tokens=args.max_new_tokens, cpu=args.cpu)
    print(format_eval_report(r))
    return 0 if r["fits"] else 3
  r = fit_report(cfg, args.topology, seq, batch, mesh, args.rules or c.get("rules"),
                 accum_steps=args.accum_steps or c.get("accum_steps", 1), cpu=args.cpu)
  print(format_report(r))
  return 0 if r["fits"] else 3


