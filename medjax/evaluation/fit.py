"""`medjax fit --job eval|generate`: will evaluating or generating with a model fit a slice?

The same ahead-of-time check as for training (`training.fit`), for the programs `medjax
eval` and `medjax generate` run: the scoring forward pass (log-probabilities of a batch of
rows) or the KV-cache decode loop, jitted exactly as they are for a mesh
(`scoring.jitted_scorer`, `generate.jitted_generator`), with the params laid out by the
training rules, lowered on abstract arrays and compiled for the topology's chips.
"""

from __future__ import annotations

import math
import time

from medjax.errors import ConfigError
from medjax.training import fit as train_fit

JOBS = ("eval", "generate")


def eval_fit_report(cfg, topology: str, seq_len: int, global_batch: int,
                    mesh_shape=(1, -1, 1), rules=None, *, job: str = "eval",
                    max_new_tokens: int = 64, cpu: bool = False) -> dict:
  """Compiles the evaluation or generation program for `topology` and measures it.

  Args:
    cfg: LlamaConfig as the checkpoint is loaded (param dtype, compute dtype, scan).
    topology: "v5p:2x2x4" style.
    seq_len: scored row length (eval) or prompt length (generate).
    global_batch: rows per forward pass, or prompts per decode batch.
    mesh_shape: (data, fsdp, tensor) sizes, one may be -1 (`--mesh` of eval/generate).
    rules: sharding rule overrides; None = training's defaults.
    job: "eval" (scoring forward) or "generate" (prefill + decode of max_new_tokens).
    max_new_tokens: decode length for job="generate".
    cpu: compile for CPU devices even when libtpu is present.
  Returns:
    dict: per-chip bytes (params, arguments, temporaries, peak/total, hbm), fits, compile
    seconds, the embedding's layout, note.
  """
  import jax
  import jax.numpy as jnp
  from medjax.evaluation import generate, scoring
  from medjax.model import llama, params as params_lib
  from medjax.parallel import sharding
  from medjax.parallel.placement import Placement
  if job not in JOBS:
    raise ConfigError(f"--job {job!r}: expected train, {' or '.join(JOBS)}")
  chip_name, _ = train_fit.parse_topology(topology)
  chip = train_fit.CHIPS[chip_name]
  devices, note = train_fit.topology_devices(topology, cpu)
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  pl = Placement(mesh, sharding.parse_rules(rules))
  shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.PRNGKey(0)))
  psh = params_lib.param_shardings(cfg, mesh, pl.rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, psh)
  param_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(params))
  rows = lambda *shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt,
                                                           sharding=pl.row_sharding(shape))
  one = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=pl.everywhere)
  b, t = global_batch, seq_len
  t0, c0 = time.time(), time.process_time()
  if job == "eval":
    lowered = scoring.jitted_scorer(pl).lower(cfg, params, rows(b, t), rows(b, t), rows(b, t),
                                              rows(b), rows(b, 1))
  else:
    lowered = generate.jitted_generator(pl).lower(
        cfg, params, rows(b, t), rows(b, t), rows(b, t), rows(b), one(jnp.uint32),
        one(jnp.float32), one(jnp.float32), one(jnp.int32), max_new_tokens=max_new_tokens,
        greedy=True)
  out = {"job": job, "topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
         "hbm": chip.hbm_bytes, "note": note, "params": cfg.num_params(),
         "param_dtype": cfg.param_dtype, "dtype": cfg.dtype, "seq_len": t, "global_batch": b,
         "max_new_tokens": max_new_tokens if job == "generate" else 0,
         "params_per_chip": param_bytes,
         "embedding": str(psh["embedding"].spec)}
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA:TPU refuses a program that overflows HBM
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    out.update(compile_s=time.time() - t0, fits=False, error=msg.splitlines()[0][:400])
    return out
  out.update(compile_s=time.time() - t0, compile_cpu_s=time.process_time() - c0)
  out.update(train_fit.memory_figures(compiled, chip))
  return out


def format_eval_report(r: dict) -> str:
  g = lambda b: f"{b / train_fit.GIB:8.2f} GiB"
  what = (f"scoring {r['global_batch']} rows x {r['seq_len']}" if r["job"] == "eval" else
          f"generating {r['max_new_tokens']} tokens for {r['global_batch']} prompts of "
          f"{r['seq_len']}")
  lines = [f"medjax fit --job {r['job']}: {r['topology']} ({r['chips']} chips, mesh "
           f"{r['mesh']}), {r['params'] / 1e9:.2f}B params ({r['param_dtype']}, compute "
           f"{r['dtype']}), {what}"]
  if r["note"]:
    lines.append(f"  NOTE: {r['note']}; memory figures are CPU estimates")
  lines.append(f"  layout: embedding {r['embedding']}")
  lines.append(f"  per chip: params           {g(r['params_per_chip'])}")
  if "arguments" in r:
    lines += [f"            arguments        {g(r['arguments'])}",
              f"            temporaries      {g(r['temporaries'])}"]
    label = "XLA peak" if r.get("peak") else "total"
    lines.append(f"            {label:<16} {g(r['total'])} of {g(r['hbm']).strip()} HBM")
    lines.append(f"  compile: {r['compile_s']:.1f} s")
  if "error" in r:
    lines.append(f"  compiler: {r['error']}")
  lines.append("  FITS" if r["fits"] else "  DOES NOT FIT")
  return "\n".join(lines)
