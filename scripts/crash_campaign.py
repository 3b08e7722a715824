"""Crash campaign: SIGKILL a tiny training run at random moments, restart it each time, and
check that it ends exactly where an uninterrupted run ends.

  python scripts/crash_campaign.py --kills 10 --seed 0 --workdir /tmp/crash

The job is `medjax train --config configs/tiny_cpt.py` on a random-init tiny model and a
generated corpus (a few seconds per run on CPU). Kills rotate between three timings: at a
random step of training, while an asynchronous checkpoint write is in flight (its orbax tmp
dir is on disk), and at a random time from launch (startup, restore, compile or training).
Then one SIGTERM at a random step: the run must checkpoint that step and exit 0 within the
grace period. A last restart runs to the end.

Checked after every kill: every finished checkpoint restores and matches the fingerprint
written with it (else it counts as corrupt), every loss logged so far equals the uninterrupted
run's, and the restart resumes from the newest checkpoint. At the end: the resumed run's
metrics.jsonl has every step once with the uninterrupted losses, bit for bit, no tmp dir is
left, and the final train state (params, optimizer state, rng) is bit-identical. Exit status
1 when any check fails. tests/test_reliability.py runs a 2-kill version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP = ".orbax-checkpoint-tmp"
MODES = ("training", "save", "launch")  # rotated; see the module docstring
WORDS = ("fever", "cough", "heart", "blood", "lung", "pain", "doctor", "the", "a", "is")


def write_corpus(path: Path, docs: int = 60, seed: int = 0) -> Path:
  rng = random.Random(seed)
  path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40))
                              for _ in range(docs)))
  return path


def train_cmd(workdir: Path, corpus: Path, steps: int, checkpoint_every: int,
              keep: int = 2) -> list[str]:
  o = {"init_from": "", "model": "tiny", "data.train": corpus, "data.replay": "",
       "data.seq_len": 64, "batch_size": 4, "total_steps": steps, "log_every": 1,
       "checkpoint_every": checkpoint_every, "keep_checkpoints": keep, "eval_every": 0,
       "eval.text": "", "optim.warmup_steps": 2,
       "data.tokenizer": "asset:tinystories-260k/tokenizer.model"}
  return ([sys.executable, "-m", "medjax.cli", "train", "--config",
           str(ROOT / "configs" / "tiny_cpt.py"), "--workdir", str(workdir)]
          + [f"--config.{k}={v}" for k, v in o.items()])


def job_env(cache_dir: str | Path) -> dict:
  """The jobs' environment. A persistent compilation cache, filled by the reference run:
  restarts then take seconds (as on a pod), and a kill never lands in a cache write."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def read_losses(workdir: Path) -> list[tuple[int, float]]:
  """(step, loss) of every complete record in metrics.jsonl, in file order."""
  path = workdir / "metrics.jsonl"
  out = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        r = json.loads(line)
      except ValueError:
        continue  # a line torn by the kill
      if "loss" in r:
        out.append((r["step"], r["loss"]))
  return out


def ckpt_dirs(workdir: Path) -> tuple[list[int], list[Path]]:
  """(finished steps, tmp dirs of unfinished writes) under WORKDIR/checkpoints."""
  d = workdir / "checkpoints"
  if not d.is_dir():
    return [], []
  names = os.listdir(d)
  return (sorted(int(n) for n in names if n.isdigit()),
          [d / n for n in names if n.endswith(TMP)])


def audit(workdir: Path) -> tuple[list[int], list[str]]:
  """(steps that restore and match their fingerprint, problems of those that do not)."""
  from medjax.checkpoints import manager as checkpoint
  from medjax.errors import CheckpointError
  good, bad = [], []
  for s in ckpt_dirs(workdir)[0]:
    try:
      checkpoint.read_step(str(workdir / "checkpoints" / str(s)))
      good.append(s)
    except CheckpointError as e:
      bad.append(str(e))
  return good, bad


def _new_tmps(workdir: Path, since: float) -> set[str]:
  """Names of the checkpoint writes started by this run and still in flight."""
  out = set()
  for p in ckpt_dirs(workdir)[1]:
    try:
      if p.stat().st_ctime >= since:
        out.add(p.name)
    except FileNotFoundError:  # renamed: that write just finished
      pass
  return out


class _Progress:
  """The newest step this run has logged: its metrics.jsonl is a new file (a resumed run
  rewrites it), re-read only when it changes, so polling costs the job little CPU."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self.ino = self._stat()[0]
    self.seen, self.step = None, 0

  def _stat(self):
    try:
      st = os.stat(self.path)
      return st.st_ino, st.st_size, st.st_mtime_ns
    except FileNotFoundError:
      return None, 0, 0

  def __call__(self) -> int:
    st = self._stat()
    if st[0] is None or st[0] == self.ino:
      return 0
    if st != self.seen:
      self.seen = st
      self.step = max((s for s, _ in read_losses(self.path.parent)), default=0)
    return self.step


def kill_run(cmd, workdir: Path, log: Path, mode: str, rng: random.Random, resume_step: int,
             checkpoint_every: int, launch_window: float, env: dict, grace: float = 30,
             timeout: float = 300) -> dict:
  """Starts the job, SIGKILLs it at a moment chosen by `mode`; what happened.

  mode "sigterm": SIGTERM at a random step instead, then SIGKILL if it has not exited
  after `grace` seconds (a TPU VM's preemption notice is 30 s).
  """
  progress = _Progress(workdir)
  target = resume_step + rng.randint(1, 2 * checkpoint_every)  # "training": kill at this step
  nth_save = rng.randint(1, 2)  # "save": kill during this run's first or second write
  delay = rng.uniform(0, launch_window)  # "launch": kill this long after launch
  saves: set[str] = set()
  t0, first_step = time.time(), None
  with open(log, "wb") as f:
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
  while p.poll() is None and time.time() - t0 < timeout:
    if mode == "save":
      saves |= _new_tmps(workdir, t0)
    if mode in ("training", "sigterm"):
      step = progress()
      if step and first_step is None:
        first_step = time.time() - t0
    if ((mode == "launch" and time.time() - t0 >= delay)
        or (mode == "save" and len(saves) >= nth_save and _new_tmps(workdir, t0))
        or (mode in ("training", "sigterm") and step >= target)):
      break
    time.sleep(0.001)
  finished = p.poll() is not None
  exit_after = None
  if not finished and mode == "sigterm":
    p.send_signal(signal.SIGTERM)
    t_sig = time.time()
    try:
      p.wait(timeout=grace)
      exit_after = time.time() - t_sig
    except subprocess.TimeoutExpired:
      pass
  if p.poll() is None:
    p.send_signal(signal.SIGKILL)
  p.wait()
  during_save = bool(_new_tmps(workdir, t0))
  return {"mode": mode, "killed": not finished, "returncode": p.returncode,
          "exit_after": exit_after,
          "during_save": during_save, "seconds": time.time() - t0, "first_step": first_step,
          # Killed before it rewrote metrics.jsonl, a run made no progress of its own.
          "logged": progress(), "last_step": max(progress(), resume_step),
          "resumed_from": resumed_from(log.read_text(errors="replace"))}


def resumed_from(output: str) -> int | None:
  m = re.search(r"resumed from \S+/(\d+)\n", output)
  return int(m.group(1)) if m else None


def compare_states(a: Path, b: Path) -> tuple[bool, int]:
  """(bit-identical, number of arrays) of the final checkpoints of two workdirs."""
  import jax
  import numpy as np
  from medjax.checkpoints import manager as checkpoint
  sa, sb = (checkpoint.read_step(str(w / "checkpoints" / str(ckpt_dirs(w)[0][-1])))[0]
            for w in (a, b))
  la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
  same = (jax.tree.structure(sa) == jax.tree.structure(sb)
          and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))
  return same, len(la)


def run_campaign(kills: int, seed: int, workdir: str | Path, steps: int | None = None,
                 checkpoint_every: int = 5, log=print, cache_dir: str | Path | None = None,
                 sigterm: bool = True, grace: float = 30, keep: int = 2) -> dict:
  """Runs the campaign: `kills` SIGKILLs, then (`sigterm`) one SIGTERM that must checkpoint
  and exit within `grace` seconds, then a restart to the end. Returns the figures."""
  rng = random.Random(seed)
  root = Path(workdir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  env = job_env(cache_dir or root / "jax_cache")
  # Enough steps that every kill lands before the end (each kill advances < 2 intervals).
  steps = steps or checkpoint_every * (2 * kills + 6)
  corpus = write_corpus(root / "corpus.txt", seed=seed)
  ref, run = root / "reference", root / "crashed"

  t0 = time.time()
  with open(root / "reference.log", "wb") as f:
    p = subprocess.Popen(train_cmd(ref, corpus, steps, checkpoint_every, keep), env=env,
                         stdout=f, stderr=subprocess.STDOUT)
  progress, t_first = _Progress(ref), None
  while p.poll() is None:
    if t_first is None and progress():
      t_first = time.time()
    time.sleep(0.01)
  if p.returncode:
    raise RuntimeError(f"reference run failed: see {root / 'reference.log'}")
  ref_seconds = time.time() - t0
  step_time = (time.time() - (t_first or t0)) / steps
  ref_loss = dict(read_losses(ref))
  log(f"reference: {steps} steps in {ref_seconds:.1f} s")

  cmd = train_cmd(run, corpus, steps, checkpoint_every, keep)
  events, corrupt, problems, mismatched, checked = [], 0, [], 0, 0
  resume_step = 0
  for i in range(kills + sigterm):
    mode = MODES[i % len(MODES)] if i < kills else "sigterm"
    # "launch" kills land in a warm restart's startup or its first two checkpoint intervals.
    startup = next((e["first_step"] for e in events if e["first_step"]), ref_seconds)
    ev = kill_run(cmd, run, root / f"run{i}.log", mode, rng, resume_step, checkpoint_every,
                  launch_window=startup + 2 * checkpoint_every * step_time, env=env)
    good, bad = audit(run)
    corrupt += len(bad)
    problems += bad
    seen = read_losses(run)  # what the killed run logged, before the restart trims it
    checked += len(seen)
    mismatched += sum(ref_loss.get(s) != l for s, l in seen)
    ev.update(resumable=good[-1] if good else 0, prior=resume_step)
    ev["lost"] = max(ev["last_step"] - ev["resumable"], 0)
    events.append(ev)
    what = (f"SIGTERM at step {ev['last_step']}: exit {ev['returncode']} after "
            f"{ev['exit_after'] or float('inf'):.1f} s" if mode == "sigterm" else
            f"kill {i + 1}/{kills} ({mode}): killed after {ev['seconds']:.1f} s at step "
            f"{ev['last_step']}" + (" during a checkpoint write" if ev["during_save"] else ""))
    log((what if ev["killed"] else f"{mode}: run ended first (exit {ev['returncode']})")
        + f"; newest good checkpoint {ev['resumable']}, {ev['lost']} steps lost")
    resume_step = ev["resumable"]
    if not ev["killed"]:
      break

  # The last restart runs to the end; every restart must resume from the newest checkpoint.
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  (root / "final.log").write_text(r.stdout + r.stderr)
  # Run k resumes from what kill k-1 left: a run that trained without saying "resumed from"
  # started over (one killed before restoring says nothing and trains nothing).
  runs = [(e["resumed_from"], e["prior"], e["logged"]) for e in events[1:]]
  runs.append((resumed_from(r.stdout), resume_step, r.returncode == 0))
  resumed = [got for got, _, _ in runs if got is not None]
  wrong = [(got, want) for got, want, trained in runs
           if (got or 0) != want and (got is not None or trained)]
  final = read_losses(run)
  good, bad = audit(run)
  same_state, n_arrays = compare_states(ref, run) if r.returncode == 0 else (False, 0)
  term = [e for e in events if e["mode"] == "sigterm"]
  kills_ = [e for e in events if e["mode"] != "sigterm"]
  fig = {
      "kills": sum(e["killed"] for e in kills_),
      "sigterm": [{"step": e["last_step"], "exit_after": e["exit_after"],
                   "returncode": e["returncode"], "lost": e["lost"]} for e in term],
      "sigterm_ok": all(e["killed"] and e["returncode"] == 0 and e["exit_after"] is not None
                        and e["lost"] == 0 for e in term),
      "kills_by_mode": {m: sum(e["killed"] and e["mode"] == m for e in events) for m in MODES},
      "kills_during_save": sum(e["during_save"] for e in kills_ if e["killed"]),
      "resumes": len(resumed),
      "resumes_from_newest": not wrong,
      "steps_lost": [e["lost"] for e in kills_ if e["killed"]],
      "checkpoint_every": checkpoint_every,
      "corrupt_checkpoints": corrupt + len(bad),
      "corrupt_problems": problems + bad,
      "tmp_dirs_left": len(ckpt_dirs(run)[1]),
      "steps": steps,
      "final_returncode": r.returncode,
      "final_steps_once": [s for s, _ in final] == list(range(1, steps + 1)),
      "losses_checked": checked + len(final),
      "losses_mismatched": mismatched + sum(ref_loss.get(s) != l for s, l in final),
      "state_identical": same_state,
      "state_arrays": n_arrays,
      "seconds": time.time() - t0,
  }
  fig["ok"] = (fig["kills"] == kills and fig["sigterm_ok"] and fig["resumes_from_newest"] and
               fig["corrupt_checkpoints"] == 0 and fig["tmp_dirs_left"] == 0 and
               fig["final_returncode"] == 0 and fig["final_steps_once"] and
               fig["losses_mismatched"] == 0 and fig["state_identical"])
  return fig


def format_figures(f: dict) -> str:
  lost = f["steps_lost"] or [0]
  by_mode = ", ".join(f"{v} {k}" for k, v in f["kills_by_mode"].items())
  rows = [
      ("kills (SIGKILL)", f"{f['kills']} ({by_mode})"),
      ("kills landing during an async checkpoint write", f["kills_during_save"]),
      ("resumes (each from the newest good checkpoint)",
       f"{f['resumes']} ({'yes' if f['resumes_from_newest'] else 'NO'})"),
      ("steps lost per kill (mean / max; checkpoint_every)",
       f"{sum(lost) / len(lost):.1f} / {max(lost)}; {f['checkpoint_every']}  {lost}"),
      ("corrupt checkpoints", f["corrupt_checkpoints"]),
      *[("SIGTERM: checkpoint at the step reached, exit 0",
         f"step {t['step']}: exit {t['returncode']} after "
         + (f"{t['exit_after']:.1f} s" if t["exit_after"] is not None else "NEVER")
         + f", {t['lost']} steps lost") for t in f["sigterm"]],
      ("half-written checkpoint dirs left", f["tmp_dirs_left"]),
      ("losses equal to the uninterrupted run (bit-identical)",
       f"{f['losses_checked'] - f['losses_mismatched']}/{f['losses_checked']}"),
      ("final metrics.jsonl: every step once", "yes" if f["final_steps_once"] else "NO"),
      ("final train state bit-identical",
       f"{'yes' if f['state_identical'] else 'NO'} ({f['state_arrays']} arrays)"),
      ("wall time", f"{f['seconds']:.0f} s for {f['steps']} steps"),
  ]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="/tmp/medjax_crash_campaign")
  p.add_argument("--steps", type=int, help="total steps (default: enough for --kills)")
  p.add_argument("--checkpoint-every", type=int, default=5)
  p.add_argument("--grace", type=float, default=30,
                 help="seconds a SIGTERMed run may take to checkpoint and exit")
  p.add_argument("--no-sigterm", dest="sigterm", action="store_false")
  a = p.parse_args(argv)
  f = run_campaign(a.kills, a.seed, a.workdir, a.steps, a.checkpoint_every, sigterm=a.sigterm,
                   grace=a.grace)
  print(format_figures(f))
  for pr in f["corrupt_problems"]:
    print(f"corrupt: {pr}")
  print("PASS" if f["ok"] else "FAIL")
  return 0 if f["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
