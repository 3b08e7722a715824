"""`bench safetensors`: reading a safetensors file tensor by tensor, medjax's reader against
the `safetensors` package, each in a fresh process: wall time and peak RSS.

The package reads through a memory map: the pages it touches count toward the process's
resident memory until the file is closed, so it is timed both ways, opened once for the whole
file and opened once per tensor.
"""

from __future__ import annotations

import json
import os
import tempfile

from medjax.bench.common import child_peak_rss

WAYS = ("medjax", "package, file opened once", "package, opened per tensor")

_CHILD = r"""
import json, sys, time
from medjax.checkpoints import safetensors_io
from safetensors import safe_open
way, path = sys.argv[1], sys.argv[2]
t, check = time.perf_counter(), 0.0
if way == "medjax":
  header, start = safetensors_io.read_header(path)
  for name in header:
    check += float(safetensors_io.read_tensor(path, name, header, start).reshape(-1)[-1])
elif way == "package, file opened once":
  with safe_open(path, framework="numpy") as f:
    for name in f.keys():
      check += float(f.get_tensor(name).reshape(-1)[-1])
else:
  with safe_open(path, framework="numpy") as f:
    names = list(f.keys())
  for name in names:
    with safe_open(path, framework="numpy") as f:
      check += float(f.get_tensor(name).reshape(-1)[-1])
print(json.dumps({"s": time.perf_counter() - t, "check": check}))
"""


def bench_safetensors(tensors: int = 16, mib: int = 64, reps: int = 3,
                      workdir: str | None = None) -> dict:
  """{way: [{"s", "rss", "check"}, ...]} over `reps` rounds, the ways in turn each round."""
  import numpy as np
  from safetensors.numpy import save_file
  side = int((mib * (1 << 20) / 4) ** 0.5)
  out = {w: [] for w in WAYS}
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    path = os.path.join(tmp, "bench.safetensors")
    rng = np.random.default_rng(0)
    save_file({f"t{i}": rng.standard_normal((side, side), dtype=np.float32)
               for i in range(tensors)}, path)
    for _ in range(reps):
      for way in WAYS:
        _, rss, text = child_peak_rss(["-c", _CHILD, way, path])
        out[way].append({**json.loads(text.strip().splitlines()[-1]), "rss": rss})
    out["file_bytes"] = os.path.getsize(path)
    out["tensor_bytes"] = side * side * 4
  return out


def safetensors_lines(r: dict) -> list[str]:
  import statistics
  mib = lambda b: b / (1 << 20)
  lines = [f"read every tensor of a {mib(r['file_bytes']):.0f} MiB safetensors file "
           f"({mib(r['tensor_bytes']):.0f} MiB tensors), one fresh process per read, "
           f"{len(r[WAYS[0]])} rounds:"]
  base = statistics.median(x["s"] for x in r[WAYS[0]])
  for w in WAYS:
    s = statistics.median(x["s"] for x in r[w])
    rss = max(x["rss"] for x in r[w])
    lines.append(f"  {w:<27} {s:6.2f} s (median; {base / s:.2f}x medjax's speed), "
                 f"peak RSS {mib(rss):7.0f} MiB")
  return lines
