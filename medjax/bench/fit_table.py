"""`bench fit`: the `medjax fit` table for the paper's TPU slices."""

from __future__ import annotations

import math

from medjax.errors import ConfigError
from medjax.model import config as config_lib
from medjax.training.fit import GIB, fit_report, parse_topology

# The fit table: MaxText's figures are its own compiles (arguments +
# temporaries per chip) at the same settings: seq 4096, fp32 weights + AdamW, bf16
# activations, full remat, pure FSDP; None where it has no figure for that case.
BENCH_CASES = (  # (preset, topology, slice, rows per chip, LlamaConfig overrides, MaxText GiB)
    ("llama2-7b", "v5p:2x2x1", "v5p-8", 1, {}, 31.6),
    ("llama2-7b", "v5p:2x2x1", "v5p-8", 4, {}, 41.2),
    ("llama2-13b", "v5p:2x2x2", "v5p-16", 1, {}, 33.0),
    ("llama2-13b", "v5p:2x2x2", "v5p-16", 4, {}, 48.9),
    ("llama2-70b", "v5p:2x2x4", "v5p-32", 1, {}, 87.7),
    ("llama2-7b", "v5e:4x4", "v5e-16", 4, {}, "fits"),
    ("llama2-7b", "v5e:4x4", "v5e-16", 5, {}, None),
    ("llama2-7b", "v5e:4x4", "v5e-16", 6, {}, "does not fit"),
    # Layer inputs wait in host memory instead (1 GiB per row for 7B).
    ("llama2-7b", "v5e:4x4", "v5e-16", 5, {"remat": "offload"}, None),
    ("llama2-7b", "v5e:4x4", "v5e-16", 6, {"remat": "offload"}, None),
)
# A compile of a few seconds for tests: every piece of the real step, tiny shapes.
QUICK_CASES = (("tiny", "v5e:2x2", "v5e-4", 2, {}, None),)


def bench_fit(quick: bool) -> list[dict]:
  """Compiles each case of the fit table (TPU via libtpu, else CPU estimates).

  Args:
    quick: one tiny-model case (seconds) instead of the 7B-70B table (minutes each).
  Returns:
    One dict per case: model, topology, batch_per_device, fits, per_device_gib (arguments
    + temporaries, as MaxText reports; the compiler's whole-heap figure when it does not
    fit), peak_gib (XLA's peak heap, what it checks against HBM), hbm_gib, compile_s,
    compile_cpu_s, remat, attention, host_gib (offloaded activations), maxtext (its
    figure or verdict), note, error.
  """
  seq = 256 if quick else 4096
  rows = []
  for preset, topo, name, per_chip, over, maxtext in QUICK_CASES if quick else BENCH_CASES:
    kw = dict(dtype="bfloat16", scan_layers=True, remat="full", attention="auto") | over
    cfg = config_lib.preset(preset, **kw)
    chips = math.prod(parse_topology(topo)[1])
    try:
      r = fit_report(cfg, topo, seq, per_chip * chips)
    except ConfigError:  # no libtpu and too few CPU devices for a 4-chip estimate
      if not quick:
        raise
      topo, name, chips = "v5e:1x1", "v5e-1", 1
      r = fit_report(cfg, topo, seq, per_chip)
    # Arguments + temporaries as MaxText reports them; if the compiler refused, its figure.
    need = r["arguments"] + r["temporaries"] if "arguments" in r else r.get("total", math.nan)
    rows.append({"model": f"{preset} seq {seq}", "topology": f"{name} ({topo})",
                 "batch_per_device": per_chip, "fits": r["fits"], "per_device_gib": need / GIB,
                 "peak_gib": r.get("total", math.nan) / GIB,
                 "hbm_gib": r["hbm"] / GIB, "compile_s": r["compile_s"],
                 "compile_cpu_s": r.get("compile_cpu_s", math.nan), "remat": cfg.remat,
                 "attention": r["attention"], "host_gib": r.get("host_temporaries", 0) / GIB,
                 "maxtext": maxtext, "note": r["note"], "error": r.get("error", "")})
  return rows


def fit_lines(rows: list[dict]) -> list[str]:
  """A markdown table with the columns of benchmarks/FIT.md."""
  def gib(x):
    return "–" if x != x else f"{x:.2f} GiB"
  lines = ["| model | slice | rows/chip | remat | args + temps | XLA peak | MaxText | fits "
           "| compile wall / CPU |", "|---|---|---:|---|---:|---:|---:|---|---:|"]
  for r in rows:
    peak = gib(r["peak_gib"]) + (f" + {r['host_gib']:.1f} GiB host" if r["host_gib"] else "")
    maxtext = r["maxtext"] if isinstance(r["maxtext"], str) else gib(r["maxtext"] or math.nan)
    lines.append(f"| {r['model']} | {r['topology']} | {r['batch_per_device']} | {r['remat']} "
                 f"| {gib(r['per_device_gib'])} | {peak} | {maxtext} "
                 f"| {'yes' if r['fits'] else 'no'} "
                 f"| {r['compile_s']:.0f} s / {r['compile_cpu_s']:.0f} s |")
  lines += [f"NOTE: {n}" for n in dict.fromkeys(r["note"] for r in rows if r.get("note"))]
  lines += [f"{r['topology']} x{r['batch_per_device']}: {r['error']}" for r in rows
            if r.get("error")]
  return lines
