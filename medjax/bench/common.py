"""Shared by the benchmarks: matmul peaks, the device line, and RESULTS.md records."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"


def median_of(xs):
  return statistics.median(xs) if xs else float("nan")


class MatmulPeak:
  """n x n matmul FLOP/s of XLA and PyTorch, sampled between benchmark steps.

  On a shared machine a single best-of figure catches a quiet moment the steps never saw;
  sampling alongside the steps and taking the median puts both under the same load.
  `reps` products run back to back per timed call (a GPU product is ~1 ms, near the cost
  of the host's clock and sync).
  """

  def __init__(self, n: int = 1024, torch: bool = True, dtype: str = "float32",
               reps: int = 1):
    import jax
    import jax.numpy as jnp
    import numpy as np
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    self.n, self.dtype, self.reps = n, dtype, reps
    self.flops, self.samples = 2 * n ** 3 * reps, {"xla": []}
    self.xa, f = jnp.asarray(a, dtype), jax.jit(lambda x: x @ x)
    f(self.xa).block_until_ready()

    def xla():
      for _ in range(reps):
        out = f(self.xa)
      out.block_until_ready()
    self.fns = {"xla": xla}
    self.datasheet = None
    if jax.default_backend() != "cpu":  # the training metrics' table of vendor figures
      from medjax.training.metrics import datasheet_peak
      self.datasheet = datasheet_peak(jax.devices()[0].device_kind)
    if torch:
      try:
        import torch as th
        from medjax.bench.models import torch_device
        dev = torch_device()
        ta = th.from_numpy(a).to(dev, getattr(th, dtype))
        sync = th.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def torch_mm():
          for _ in range(reps):
            ta @ ta
          sync()
        torch_mm()
        self.fns["torch"] = torch_mm
        self.samples["torch"] = []
      except ImportError:
        pass

  @classmethod
  def for_backend(cls, torch: bool = True) -> "MatmulPeak":
    """f32 1024^3 on CPU (the goals' reference); bf16 8192^3, 5 per call, elsewhere."""
    from medjax.bench.models import on_accelerator
    if on_accelerator():
      return cls(8192, torch, "bfloat16", reps=5)
    return cls(1024, torch)

  def sample(self, reps: int = 1, keys=None) -> None:
    """One sample per library and rep: the median of 3 back-to-back calls (a single call
    right after a training step also times waking the thread pool)."""
    for _ in range(reps):
      for k, fn in self.fns.items():
        if keys is not None and k not in keys:
          continue
        calls = []
        for _ in range(3):
          t = time.perf_counter()
          fn()
          calls.append(time.perf_counter() - t)
        self.samples[k].append(self.flops / median_of(calls))

  def median(self) -> dict:
    return {k: median_of(v) for k, v in self.samples.items()}

  def best(self) -> dict:
    return {k: max(v) for k, v in self.samples.items()}

  def describe(self) -> str:
    med, best = self.median(), self.best()
    dt = {"float32": "f32", "bfloat16": "bf16"}.get(self.dtype, self.dtype)
    s = (f"matmul {dt} {self.n}^3 ({len(self.samples['xla'])} samples between blocks): XLA median "
         f"{fmt_rate(med['xla'])} (best {fmt_rate(best['xla'])})")
    if "torch" in med:
      s += (f", torch median {fmt_rate(med['torch'])} (best {fmt_rate(best['torch'])}); "
            f"XLA/torch {med['xla'] / med['torch']:.2f}")
    return s


# Runs `python -m MOD ARGS` or `python -c CODE ARGS` and writes the process's VmHWM to a file.
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (Linux keeps
# the high-water mark across exec), so a benchmark parent holding a model would set a floor
# under every child's figure.
_PEAK_WRAPPER = """
import os, runpy, sys
kind, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
try:
  if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
  else:
    exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
finally:
  with open("/proc/self/status") as f:
    hwm = next(ln for ln in f if ln.startswith("VmHWM"))
  with open(os.environ["MEDJAX_PEAK_FILE"], "w") as f:
    f.write(str(int(hwm.split()[1]) * 1024))
"""


def child_peak_rss(python_args: list[str], env: dict | None = None) -> tuple[float, int, str]:
  """(wall s, peak resident bytes, output) of `python -m MOD ...` or `python -c CODE ...`
  run in a child process (with `env` added to this one's); a failure raises with the
  child's output."""
  with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
    env = dict(os.environ, **(env or {}), MEDJAX_PEAK_FILE=peak.name)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *python_args], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
      raise RuntimeError(f"python {' '.join(python_args)} failed ({p.returncode}):\n"
                         f"{p.stdout[-2000:]}")
    return wall, int(Path(peak.name).read_text()), p.stdout


def device_info() -> str:
  import jax
  d = jax.devices()[0]
  if d.platform != "cpu":
    return f"{jax.device_count()} x {d.device_kind}"
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read().splitlines()
    model = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    flags = set(next(ln.split(":", 1)[1] for ln in info if ln.startswith("flags")).split())
  except (OSError, StopIteration):
    pass
  # XLA:CPU and PyTorch pick their matmul kernels by vector ISA: AMD and Intel hosts of the
  # same core count differ (e.g. AMX on Intel), so the ISA is part of every CPU figure.
  isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"),
                                 ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_tile"))
         if flag in flags]
  xla = os.environ.get("XLA_FLAGS", "").strip()
  return (f"CPU, {os.cpu_count()} cores ({model}; {', '.join(isa) or 'no AVX2'})"
          + (f", XLA_FLAGS={xla}" if xla else ""))


def commit() -> str:
  """git's short HEAD, or $MEDJAX_COMMIT when set (a copy of the tree sent to another
  machine may carry a stale .git or none)."""
  if os.environ.get("MEDJAX_COMMIT"):
    return os.environ["MEDJAX_COMMIT"]
  root = Path(__file__).resolve().parents[2]
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                         capture_output=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           text=True, capture_output=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    sha, dirty = "", ""
  return (sha or "unknown") + (" (uncommitted changes)" if dirty else "")


def record(args, title: str, lines: list[str]) -> None:
  """Prints the figures and appends them to the results file (unless --no-record)."""
  print("\n".join(lines))
  if args.no_record:
    return
  path = Path(args.results or RESULTS)
  path.parent.mkdir(parents=True, exist_ok=True)
  cmd = shlex.join(["medjax", *sys.argv[1:]]) if Path(sys.argv[0]).name in (
      "medjax", "cli.py") else shlex.join(sys.argv)
  note = f" — {args.note}" if args.note else ""
  head = [f"## {title}", "",
          f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
          f"- device: {device_info()}{note}",
          f"- commit: {commit()}", f"- command: `{cmd}`", "", "```"]
  new = not path.exists()
  with open(path, "a") as f:
    if new:
      f.write("# medjax benchmark results\n\nAppended by `medjax bench`; newest last.\n\n")
    f.write("\n".join(head + lines + ["```", "", ""]))
  print(f"(appended to {path})")


def fmt_rate(x: float) -> str:
  return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e13 else f"{x / 1e9:.2f} GFLOP/s"
