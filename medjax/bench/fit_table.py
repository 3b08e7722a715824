"""`bench fit`: the `medjax fit` table for the paper's TPU slices."""

from __future__ import annotations

import math


def bench_fit(quick: bool) -> list[dict]:
  """The fit table's rows (`medjax.fit.bench_cases`)."""
  from medjax import fit
  return fit.bench_cases(quick)


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
