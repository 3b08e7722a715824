"""Training metrics: console progress bar, `metrics.jsonl`, TensorBoard, tokens/s and MFU."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"  # one JSON record per line, in every training workdir

# Peak dense bf16 FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measure_cpu_peak(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a jitted f32 matmul on this host: the CPU 'peak' MFU is measured against."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def device_peak_flops() -> tuple[float, str]:
  """Total peak FLOP/s of all devices, and where the figure comes from."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    # Fake CPU devices share the same cores: the host's measured peak is the total.
    return measure_cpu_peak(), "measured f32 matmul"
  kind = getattr(d, "device_kind", "")
  peak = datasheet_peak(kind)
  if peak is not None:
    return peak * jax.device_count(), f"{kind} spec"
  return float("nan"), f"unknown device kind {kind!r}"


def datasheet_peak(device_kind: str) -> float | None:
  """One chip's `PEAK_FLOPS` entry for a jax `device_kind`, or None if unlisted."""
  return next((v for k, v in PEAK_FLOPS.items() if device_kind.startswith(k)), None)


class Logger:
  """Aggregates fetched step metrics and writes them to console, jsonl and TensorBoard."""

  def __init__(self, workdir: str, cfg, c, total: int, start: int = 0):
    self.primary = jax.process_index() == 0
    self.flops_per_token = cfg.flops_per_token(c.data.seq_len)
    self.peak, self.peak_src = device_peak_flops()
    self.t_last = time.perf_counter()
    self.step_last = start
    self.tokens_seen = 0.0  # every processed (non-padding) token
    self.loss_tokens_seen = 0.0  # the tokens the loss is taken on
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    self.bar = None
    if self.primary:
      try:
        self.tb = _summary_writer(os.path.join(workdir, "tb"))
      except ImportError:  # optional
        self.tb = None
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, desc="train", unit="step",
                      dynamic_ncols=True, mininterval=1.0)

  def log(self, step: int, fetched: list[dict], skipped: int = 0,
          extra: dict | None = None) -> dict:
    now = time.perf_counter()
    dt = max(now - self.t_last, 1e-9)
    # Throughput and MFU count every token the model processed (SFT prompts included: the
    # forward and backward run over them); loss-bearing tokens are logged beside them.
    tokens = float(sum(float(m["processed"]) for m in fetched))
    loss_tokens = float(sum(float(m["tokens"]) for m in fetched))
    self.tokens_seen += tokens
    self.loss_tokens_seen += loss_tokens
    m = fetched[-1]
    rec = {
        "step": step,
        "loss": float(np.mean([float(x["loss"]) for x in fetched if bool(x["finite"])] or
                              [float("nan")])),
        "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
        "tokens_per_s": tokens / dt, "tokens_seen": self.tokens_seen,
        "loss_tokens_per_s": loss_tokens / dt, "loss_tokens_seen": self.loss_tokens_seen,
        "step_time_s": dt / max(step - self.step_last, 1), "skipped_steps": skipped,
    }
    # MFU from processed tokens; padding is not counted (it is not the model's work).
    rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / self.peak
    rec.update(extra or {})
    self.t_last, self.step_last = now, step
    self._write(rec)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                           mfu=f"{rec['mfu']:.1%}")
    return rec

  def reset_clock(self) -> None:
    self.t_last = time.perf_counter()

  def log_eval(self, step: int, evals: dict) -> None:
    if evals:
      self._write({"step": step, **evals})
      if self.bar is not None:
        self.bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items()))

  def _write(self, rec: dict) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self.tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, rec["step"])
      self.tb.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


def mixture_fractions(train_it) -> dict[str, float]:
  """`mix/NAME`: each mixture source's share of the tokens trained since the last call,
  over all processes (every process must call it at the same step). {} without a mixture."""
  take = getattr(train_it, "take_source_tokens", None)
  counts = take() if take is not None else None
  if counts is None:
    return {}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
  total = float(np.sum(counts))
  if not total:
    return {}
  return {f"mix/{n}": float(x) / total for n, x in zip(train_it.source_names, counts)}


def records(path: str):
  """(line, record) for each JSON object line of a metrics file; a line torn by a crash (or
  anything not an object) is skipped. Nothing when the file does not exist."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if isinstance(rec, dict):
        yield line, rec


def trim_metrics(workdir: str, step: int) -> None:
  """Drops `metrics.jsonl` records after `step` (and a line torn by a crash), so a resumed
  run's log continues the uninterrupted one instead of repeating the steps it lost."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  keep = [line if line.endswith("\n") else line + "\n"
          for line, rec in records(path) if rec.get("step", 0) <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
  is installed (2.3 s at every run start on the CPU here) and needs none of it for scalars."""
  import sys
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX skips it
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(logdir)
