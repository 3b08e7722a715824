"""`medjax fit`: will a training run fit a TPU slice? (`training.fit` does the compile.)

  medjax fit --model llama2-7b --seq-len 4096 --batch-per-device 1 --topology v5p:2x2x1
"""

from __future__ import annotations

import math
import os

from medjax.model.config import ATTENTION, REMAT_POLICIES


def add_args(p):
  p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1, v5e:2x4, v4:2x2x2")
  p.add_argument("--config", help="training config file[:arg] (reads model, model_overrides, "
                 "data.seq_len, batch_size, mesh, rules, accum_steps); flags override it")
  p.add_argument("--model", help="model preset (default llama2-7b)")
  p.add_argument("--seq-len", type=int)
  p.add_argument("--batch-per-device", type=int, help="rows per chip (default 1)")
  p.add_argument("--mesh", help="data,fsdp,tensor sizes, one may be -1 (default 1,-1,1)")
  p.add_argument("--remat", choices=REMAT_POLICIES, help="what each layer keeps for the "
                 "backward pass (default full; offload keeps layer inputs in host memory)")
  p.add_argument("--attention", choices=ATTENTION,
                 help="default auto: the splash kernel on TPU, einsum for CPU estimates")
  p.add_argument("--dtype", help="compute dtype (default bfloat16)")
  p.add_argument("--no-scan", dest="scan", action="store_false", default=None,
                 help="unrolled layers (slower to compile)")
  p.add_argument("--accum-steps", type=int)
  p.add_argument("--rules", help="sharding rule overrides, e.g. 'embed=;mlp=tensor'")
  p.add_argument("--cpu", action="store_true", help="compile for CPU devices, not libtpu")
  p.add_argument("--job", choices=("train", "eval", "generate"), default="train",
                 help="the program to check: the train step (default), `medjax eval`'s "
                      "scoring pass (rows of --seq-len), or `medjax generate`'s decode loop "
                      "(prompts of --seq-len)")
  p.add_argument("--max-new-tokens", type=int, default=256, help="for --job generate")


def _read_config(spec: str) -> dict:
  """Fields `fit` uses from a `get_config(arg)` file (any missing field is skipped)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  s = importlib.util.spec_from_file_location("_fit_config", path)
  mod = importlib.util.module_from_spec(s)
  s.loader.exec_module(mod)
  c = mod.get_config(arg or None)
  get = lambda obj, k: obj.get(k) if hasattr(obj, "get") else getattr(obj, k, None)
  out = {"model": get(c, "model"), "overrides": dict(get(c, "model_overrides") or {}),
         "seq_len": get(get(c, "data") or {}, "seq_len") or get(c, "seq_len"),
         "global_batch": get(c, "batch_size"), "rules": get(c, "rules"),
         "accum_steps": get(c, "accum_steps")}
  mesh = get(c, "mesh")
  if mesh is not None:
    out["mesh"] = tuple(int(get(mesh, k)) for k in ("data", "fsdp", "tensor"))
  if isinstance(out["overrides"].get("lora_targets"), str):
    out["overrides"]["lora_targets"] = tuple(out["overrides"]["lora_targets"].split(","))
  return {k: v for k, v in out.items() if v not in (None, "")}


def run(args):
  from medjax.model import config as config_lib
  from medjax.training.fit import fit_report, format_report, parse_topology
  chip, dims = parse_topology(args.topology)
  n = math.prod(dims)
  if not os.environ.get("XLA_FLAGS", "").count("device_count"):
    # Room for a CPU estimate; must happen before jax starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
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
  mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else c.get("mesh", (1, -1, 1))
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


