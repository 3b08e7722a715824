"""The demo's step cache: each finished step leaves a marker holding the run's signature, so
rerunning the same command reuses it; any change of settings or inputs reruns from there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

TOTAL_STEPS = 7


def _log(msg: str) -> None:
  print(msg, flush=True)


class Steps:
  """Runs named steps once: a step whose marker holds this run's signature is reused.

  Once a step runs (not reused), every later step runs too: its inputs may have changed.
  """

  def __init__(self, workdir: str, signature: str, redo: bool = False):
    self.dir = os.path.join(workdir, "steps")
    self.signature = signature
    self.stale = redo
    self.timings: dict[str, dict] = {}
    os.makedirs(self.dir, exist_ok=True)

  def run(self, index: int, name: str, title: str, fn) -> dict:
    marker = os.path.join(self.dir, f"{name}.json")
    if not self.stale and os.path.exists(marker):
      with open(marker) as f:
        rec = json.load(f)
      if rec.get("signature") == self.signature:
        _log(f"[{index}/{TOTAL_STEPS}] {title}: reusing finished step ({marker})")
        self.timings[name] = {"seconds": rec["seconds"], "reused": True,
                              "note": short(rec["result"])}
        return rec["result"]
    self.stale = True
    _log(f"[{index}/{TOTAL_STEPS}] {title}")
    t = time.perf_counter()
    result = fn()
    secs = time.perf_counter() - t
    with open(marker + ".tmp", "w") as f:
      json.dump({"signature": self.signature, "seconds": secs, "result": result}, f, indent=1)
    os.replace(marker + ".tmp", marker)  # written last: its presence means the step finished
    self.timings[name] = {"seconds": secs, "reused": False, "note": short(result)}
    _log(f"    done in {secs:.1f}s: {short(result)}")
    return result

  def fresh_dir(self, path: str) -> str:
    """A step's output dir: kept if this run started it (so training resumes), else emptied."""
    sig = os.path.join(path, ".demo-signature")
    keep = False
    if os.path.exists(sig):
      with open(sig) as f:
        keep = f.read() == self.signature
    if not keep:
      shutil.rmtree(path, ignore_errors=True)
      os.makedirs(path)
      with open(sig, "w") as f:
        f.write(self.signature)
    return path


def short(result: dict) -> str:
  """A step's one-line outcome: its `summary` when the `note` is a paragraph."""
  return result.get("summary") or result.get("note", "")


def signature(settings: dict, base: str, corpus_paths: list[str], cmexam_path: str) -> str:
  """Hash of everything that decides the outputs: settings and input files (path, size)."""
  def stat(p):
    files = [p] if os.path.isfile(p) else sorted(
        os.path.join(r, n) for r, _, names in os.walk(p) for n in names)
    return [(f, os.path.getsize(f)) for f in files]
  blob = json.dumps({"settings": settings, "base": stat(base), "cmexam": stat(cmexam_path),
                     "corpus": [stat(p) for p in corpus_paths], "v": 1}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
