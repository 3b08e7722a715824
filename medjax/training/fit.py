"""`medjax fit`: will this training run fit the TPU slice, and how fast could it be?

Compiles the real sharded train step ahead of time for a TPU topology on this (CPU)
machine, the way MaxText's train_compile.py does: libtpu describes the slice's chips
(`jax.experimental.topologies`), the step is lowered on abstract arrays laid out on that
mesh, and XLA:TPU compiles it. The compiled step says how much HBM each chip needs and how
many FLOPs a step costs. Without libtpu the step is compiled for as many CPU devices instead,
and the report says its memory figures are CPU estimates.

The command line is `medjax.cli.fit`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import types

from medjax.errors import ConfigError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  peak_bf16_flops: float  # per chip


CHIPS = {
    "v4": Chip(32 * GIB, 275e12),
    "v5e": Chip(16 * GIB, 197e12),
    "v5p": Chip(95 * GIB, 459e12),
    "v6e": Chip(32 * GIB, 918e12),
}
# Only shapes matter for compiling; these optimizer values change nothing in the report.
_OPTIM = types.SimpleNamespace(lr=3e-4, warmup_steps=100, total_steps=1000, final_lr_ratio=0.1,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
_BATCH_FIELDS = {"inputs": "int32", "targets": "int32", "loss_mask": "float32",
                 "segment_ids": "int32", "positions": "int32"}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """"v5p:2x2x1" -> ("v5p", (2, 2, 1)), chips per dimension of the slice."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology.strip())
  if not m:
    raise ConfigError(f"--topology {topology!r}: expected CHIP:AxB[xC] with CHIP one of "
                      f"{', '.join(CHIPS)}, e.g. v5p:2x2x1 or v5e:2x4")
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if min(dims) < 1:
    raise ConfigError(f"--topology {topology!r}: every dimension must be at least 1")
  return m.group(1), dims


def topology_devices(topology: str, cpu: bool = False):
  """Devices to compile for: libtpu's compile-only TPU chips, else CPU devices.

  Returns:
    (devices, note): note is "" for TPU, else why the CPU stands in.
  """
  import jax
  chip, dims = parse_topology(topology)
  n = math.prod(dims)
  reason = "--cpu given"
  if not cpu:
    # The lockfile stops two processes from driving one TPU; we only compile, never run,
    # so sharing libtpu with other jax processes on this machine is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    dims3 = (*dims, 1)[:3]
    kw = {}
    if any(d < h for d, h in zip(dims3, (2, 2, 1))):  # fewer chips than one host holds
      kw["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(dims3, (2, 2, 1)))
    if chip == "v4":
      kw["chip_config_name"] = "megacore"  # one device per chip, as jax uses v4
    try:
      topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
      return list(topo.devices), ""
    except Exception as e:  # no libtpu, or it refuses this topology
      reason = f"no TPU compiler ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ConfigError(f"{reason}; a CPU estimate needs {n} CPU devices but jax has "
                      f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
                      " before jax starts (the `medjax fit` command does this itself)")
  return devices[:n], f"CPU ESTIMATE, not TPU: {reason}"


def fit_report(cfg, topology: str, seq_len: int, global_batch: int,
               mesh_shape=(1, -1, 1), rules=None, *, accum_steps: int = 1, oc=None,
               cpu: bool = False, compiler_options: dict | None = None) -> dict:
  """Compiles one train step for `topology` and measures it.

  Args:
    cfg: LlamaConfig (dtype, remat, scan_layers as the run will use them).
    topology: "v5p:2x2x1" style; chip kinds in CHIPS.
    seq_len, global_batch: tokens per row and rows per step.
    mesh_shape: (data, fsdp, tensor) sizes, one may be -1.
    rules: sharding rules (anything `sharding.parse_rules` takes); None = defaults.
    accum_steps: micro-batches per step.
    oc: optimizer fields for `make_optimizer`; defaults are fine (only shapes matter).
    cpu: compile for CPU devices even when libtpu is present.
    compiler_options: XLA options for this compile (e.g. {"xla_dump_to": DIR}).
  Returns:
    dict with per-chip bytes (arguments, outputs, aliased, temporaries, code, total, hbm),
    fits, XLA and analytic FLOPs per step, ideal step time, compile seconds, specs, note.
  """
  import jax
  from medjax.model import llama
  from medjax.parallel import sharding
  from medjax.training import optim, state as state_lib, step as step_lib
  chip_name, _ = parse_topology(topology)
  chip = CHIPS[chip_name]
  devices, note = topology_devices(topology, cpu)
  rules = sharding.parse_rules(rules)
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % (n_batch * accum_steps):
    raise ConfigError(f"global batch {global_batch} must be a multiple of data*fsdp="
                      f"{n_batch} times accum_steps={accum_steps}")

  # Abstract state and batch, laid out on the target mesh: nothing is allocated.
  params_shape = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.PRNGKey(0)))
  optimizer, schedule = optim.make_optimizer(oc or _OPTIM, cfg, params_shape)
  shardings = state_lib.state_shardings(cfg, optimizer, mesh, rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state_lib.abstract_state(cfg, optimizer), shardings)
  bsh = sharding.batch_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len), dt, sharding=bsh)
           for k, dt in _BATCH_FIELDS.items()}
  specs = sharding.describe(shardings, log=lambda *a: None)
  try:
    sharding.assert_params_sharded(state["params"], mesh)
    replication = ""
  except ConfigError as e:
    replication = str(e)
  state_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(state))

  step = step_lib.jit_train_step(cfg, optimizer, schedule, mesh, shardings, rules,
                                 accum_steps=accum_steps)
  t0, c0 = time.time(), time.process_time()
  lowered = step.lower(state, batch)
  lower_s = time.time() - t0
  out = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
         "hbm": chip.hbm_bytes, "note": note, "specs": {k: str(v) for k, v in specs.items()},
         "replication": replication, "state_per_chip": state_bytes, "lower_s": lower_s,
         "params": cfg.num_params(), "seq_len": seq_len, "global_batch": global_batch,
         "scan": cfg.scan_layers, "remat": cfg.remat,
         "attention": _attention_used(cfg, seq_len, devices)}
  try:
    compiled = lowered.compile(compiler_options)
  except Exception as e:  # XLA:TPU refuses a program that overflows HBM
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    out.update(compile_s=time.time() - t0, compile_cpu_s=time.process_time() - c0, fits=False,
               error=msg.splitlines()[0][:400], pallas_kernels=_kernels(lowered))
    out.update(_analytic(cfg, seq_len, global_batch, len(devices), chip))
    # e.g. "... required for HLO temporaries (35.08G) exceeds available HBM (15.75G)". The
    # figure is the whole heap the compiler laid out, arguments (the state) included.
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", msg)
    if m:
      need = float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2)]
      out.update(total=max(need, state_bytes), temporaries=max(need - state_bytes, 0))
    return out
  # Wall time includes waiting for a shared CPU; process time is this compile's own work.
  out.update(compile_s=time.time() - t0, compile_cpu_s=time.process_time() - c0,
             pallas_kernels=_kernels(lowered))
  out.update(memory_figures(compiled, chip))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["xla_flops"] = float(cost.get("flops", 0.0)) * len(devices)  # cost is per device
  out.update(_analytic(cfg, seq_len, global_batch, len(devices), chip))
  return out


def memory_figures(compiled, chip: Chip) -> dict:
  """Per-chip bytes of a compiled program: arguments, outputs, aliased, temporaries, code,
  XLA's peak, the total checked against HBM, and whether it fits."""
  mem = compiled.memory_analysis()
  args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  code = mem.generated_code_size_in_bytes
  # XLA's peak is its heap, arguments included, which is what it checks against HBM; the
  # temporaries buffer overlaps the arguments' lifetimes, so arguments + temporaries (what
  # MaxText prints) overstates it (17.9 vs 13.4 GiB for 7B, 4 rows per chip on v5e-16).
  peak = getattr(mem, "peak_memory_in_bytes", 0)
  # Without a peak (CPU): donated state buffers are reused for the outputs, count them once.
  total = peak or args + outs - alias + temp + code
  return dict(arguments=args, outputs=outs, aliased=alias, temporaries=temp, code=code,
              peak=peak, total=total, fits=total <= chip.hbm_bytes,
              host_temporaries=getattr(mem, "host_temp_size_in_bytes", 0))  # remat="offload"


def _kernels(lowered) -> int:
  """Pallas kernels in the program (splash attention: forward, and dq, dkv for backward)."""
  return lowered.as_text().count("custom_call @tpu_custom_call")


def _attention_used(cfg, seq_len: int, devices) -> str:
  """The attention the compiled step uses (the model's own choice, `attention_tpu.wanted`)."""
  from medjax.model import attention_tpu
  if attention_tpu.wanted(cfg.attention, seq_len, on_tpu=devices[0].platform == "tpu"):
    return "splash"
  return "einsum" if cfg.attention in ("auto", "splash") else cfg.attention


def _analytic(cfg, seq_len, global_batch, chips, chip: Chip) -> dict:
  flops = cfg.flops_per_token(seq_len) * seq_len * global_batch
  return {"model_flops": flops, "ideal_step_s": flops / (chips * chip.peak_bf16_flops),
          "tokens_per_s_ideal": seq_len * global_batch * chips * chip.peak_bf16_flops / flops}


def format_report(r: dict) -> str:
  g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB else f"{b / (1 << 20):8.2f} MiB"
  lines = [f"medjax fit: {r['topology']} ({r['chips']} chips, mesh {r['mesh']}), "
           f"{r['params'] / 1e9:.2f}B params, batch {r['global_batch']} x {r['seq_len']}"]
  if r["note"]:
    lines.append(f"  NOTE: {r['note']}; memory figures are CPU estimates")
  lines.append("  layout:")
  lines += [f"    {k:<24} {v}" for k, v in r["specs"].items()]
  if r["replication"]:
    lines.append(f"  WARNING: {r['replication']}")
  lines.append(f"  compile: {r['compile_s']:.1f} s ({r.get('compile_cpu_s', 0):.1f} s CPU), "
               f"{r['attention']} attention, remat {r['remat']}")
  lines.append(f"  per chip: train state      {g(r['state_per_chip'])}")
  if "arguments" not in r and "temporaries" in r:
    lines.append(f"            temporaries      {g(r['temporaries'])} (from the compiler's error)")
  if "arguments" in r:
    lines += [f"            arguments        {g(r['arguments'])}",
              f"            outputs          {g(r['outputs'])} ({g(r['aliased']).strip()} "
              "reuse donated inputs)",
              f"            temporaries      {g(r['temporaries'])}",
              f"            code             {g(r['code'])}",
              f"            args + temps     {g(r['arguments'] + r['temporaries'])} (MaxText's "
              "figure; overlaps)"]
    if r.get("host_temporaries"):
      lines.append(f"            host memory      {g(r['host_temporaries'])} (offloaded "
                   "activations)")
  if "total" in r:
    what = "XLA peak" if r.get("peak") else "total"
    lines.append(f"            {what:<16} {g(r['total'])} of {g(r['hbm']).strip()} HBM")
  if "error" in r:
    lines.append(f"  compiler: {r['error']}")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(f"  {verdict}")
  if "xla_flops" in r:
    how = ("counts the scanned layer loop once; use --no-scan for a full count" if r["scan"]
           else "includes remat recompute")
    lines.append(f"  FLOPs/step: XLA {r['xla_flops']:.3e} ({how}), "
                 f"analytic 6N+attention {r['model_flops']:.3e}")
  else:
    lines.append(f"  FLOPs/step: analytic 6N+attention {r['model_flops']:.3e}")
  lines.append(f"  ideal step time at peak bf16: {r['ideal_step_s'] * 1e3:.3g} ms "
               f"({r['tokens_per_s_ideal']:.3g} tokens/s)")
  return "\n".join(lines)
