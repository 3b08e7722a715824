"""Crashes, corruption, a full disk and non-finite steps (SIGTERM + exact resume is in
test_train.py; the full 10-kill campaign is `scripts/crash_campaign.py`).

Every run is `medjax train` in a subprocess with the same shapes and total_steps, sharing one
persistent compilation cache, so only the first compiles.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medjax.checkpoints import manager as checkpoint
from medjax.data import from_config
from medjax.errors import CheckpointError
from test_train import CONFIGS, _losses, _overrides

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # = the short campaign's, so its compiled step is reused


def _campaign():
  spec = importlib.util.spec_from_file_location("crash_campaign",
                                                ROOT / "scripts" / "crash_campaign.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _run(cmd: list[str], cache: Path, nan_at: int = 0, fsize: int = 0):
  """Runs `medjax ARGS` (cmd[3:] of a `python -m medjax.cli ARGS` line). nan_at: that batch
  gets a NaN; fsize: files above that many bytes cannot be written (EFBIG, as on a full
  disk; root too)."""
  cmd = [sys.executable, __file__, str(nan_at), str(fsize), *cmd[3:]]
  return subprocess.run(cmd, env=_campaign().job_env(cache / "jax_cache"), capture_output=True,
                        text=True, timeout=600, cwd=ROOT)


def _train(cache, workdir, *, nan_at=0, fsize=0, **kw) -> subprocess.CompletedProcess:
  """`medjax train` on test_train's tiny config (same shapes as the campaign's)."""
  kw = {"steps": STEPS, **kw}
  argv = ["train", "--config", str(CONFIGS / "tiny_cpt.py"), "--workdir", str(workdir),
          *_overrides(cache, **kw)]
  return _run(["python", "-m", "medjax.cli", *argv], cache, nan_at, fsize)


@pytest.fixture(scope="module")
def campaign(cache, tmp_path_factory):
  """A 2-kill campaign; its uninterrupted reference run (checkpoints 18, 21, 24) is reused."""
  cc = _campaign()
  root = tmp_path_factory.mktemp("campaign")
  f = cc.run_campaign(kills=2, seed=0, workdir=root, steps=STEPS, checkpoint_every=3,
                      keep=3, log=lambda m: None, cache_dir=cache / "jax_cache")
  resume = lambda w, *extra, **kw: _run(
      cc.train_cmd(w, root / "corpus.txt", STEPS, 3, 3) + list(extra), cache, **kw)
  return f, root / "reference", resume, cc


def test_short_crash_campaign(campaign):
  """2 SIGKILLs (mid-training, during an async checkpoint write) and a SIGTERM, restarts,
  exact result."""
  f, _, _, cc = campaign
  assert f["kills"] == 2 and f["kills_by_mode"]["save"] == 1, f
  (t,) = f["sigterm"]  # SIGTERM: the step reached is checkpointed, exit 0 within the grace
  assert t["returncode"] == 0 and t["exit_after"] < 30 and t["lost"] == 0, f
  assert f["corrupt_checkpoints"] == 0 and f["tmp_dirs_left"] == 0, f
  assert f["resumes_from_newest"] and f["final_steps_once"], f
  assert f["losses_mismatched"] == 0 and f["state_identical"], f
  assert f["ok"]
  assert "| corrupt checkpoints" in cc.format_figures(f)


def _damage(step_dir: Path, how: str) -> None:
  data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  big = max(data, key=lambda p: p.stat().st_size)  # the chunk holding most of the arrays
  raw = bytearray(big.read_bytes())
  if how == "truncated":
    big.write_bytes(raw[: len(raw) // 2])
  else:  # same length, bytes overwritten: only a content check can tell
    raw[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    big.write_bytes(bytes(raw))


def test_corrupt_checkpoints_are_named_and_skipped_and_the_run_continues(campaign, tmp_path):
  """Newest truncated, the one before overwritten in place (only the fingerprint can tell):
  both reported by path and moved aside; the run resumes from the third and ends exactly
  as the undamaged run did."""
  _, ref_dir, resume, _ = campaign
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)
  ref = _losses(w)
  _damage(w / "checkpoints" / "24", "truncated")
  _damage(w / "checkpoints" / "21", "overwritten")
  for s in (24, 21):
    with pytest.raises(CheckpointError):
      checkpoint.read_step(str(w / "checkpoints" / str(s)))
  r = resume(w)
  assert r.returncode == 0, r.stderr[-3000:]
  for s in (24, 21):
    assert f"warning: checkpoint {w / 'checkpoints' / str(s)} is corrupt" in r.stderr, r.stderr
    assert (w / "checkpoints" / f"{s}.corrupt").is_dir()  # kept aside for inspection
  assert "fingerprint" in r.stderr  # how the overwritten one was caught
  assert f"resumed from {w / 'checkpoints'}/18" in r.stdout
  for s in (21, 24):
    checkpoint.read_step(str(w / "checkpoints" / str(s)))  # written again, good
  got = _losses(w)
  assert sorted(got) == list(range(1, STEPS + 1)) and got == ref  # continued exactly


def test_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(campaign, tmp_path):
  _, ref_dir, resume, _ = campaign
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)
  shutil.rmtree(w / "checkpoints" / "24")  # as if the run had stopped at 21
  # Arrays (1.4 MB) do not fit, small files do. Orbax deletes beyond keep_checkpoints=1 only
  # once a newer save has been committed: 24 never is, so 18 and 21 both stay.
  r = resume(w, "--config.keep_checkpoints=1", fsize=512 << 10)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert last.startswith(f"medjax train: error: {w / 'checkpoints' / '24'}: checkpoint could "
                         "not be written (ValueError: File too large"), last
  assert last.endswith(f"the previous checkpoint {w / 'checkpoints' / '21'} is intact"), last
  assert sorted(os.listdir(w / "checkpoints")) == ["18", "21"]  # and no tmp dir is left
  for s in (18, 21):
    checkpoint.read_step(str(w / "checkpoints" / str(s)))


def test_nan_batch_skipped_in_the_training_loop(cache, tmp_path):
  r = _train(cache, tmp_path / "w", nan_at=2, nan_policy="skip")
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl")]
  assert [r["skipped_steps"] for r in recs] == [0] + [1] * (STEPS - 1)
  assert np.isnan(recs[1]["loss"]) and all(np.isfinite(r["loss"]) for r in recs[2:])
  state, _ = checkpoint.read_step(str(tmp_path / "w" / "checkpoints" / str(STEPS)))
  assert int(state["skipped"]) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(state["params"]))


def test_nan_policy_stop_exits_before_checkpointing_past_it(cache, tmp_path):
  """Logging only at the end, the NaN at step 5 still stops the run at the step-6
  checkpoint: nothing past the bad step is saved."""
  w = tmp_path / "w"
  r = _train(cache, w, nan_at=5, nan_policy="stop", log_every=100, checkpoint_every=3)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert last.startswith("medjax train: error: non-finite loss or gradient at or before "
                         "step 6 (nan_policy=stop"), last
  assert last.endswith(f"last checkpoint: {w / 'checkpoints'}/3"), last
  assert sorted(os.listdir(w / "checkpoints")) == ["3"]
  state, _ = checkpoint.read_step(str(w / "checkpoints" / "3"))
  assert int(state["skipped"]) == 0


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


class _Poisoned:
  """A train iterator whose `bad`-th batch has a NaN in its loss mask."""

  def __init__(self, it, bad: int):
    self.it, self.bad, self.n = it, bad, 0

  def __next__(self):
    b = next(self.it)
    self.n += 1
    if self.n == self.bad:
      b = dict(b, loss_mask=b["loss_mask"].copy())
      b["loss_mask"][0, 0] = np.nan
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


if __name__ == "__main__":
  # `python test_reliability.py BAD FSIZE train ...`: a NaN in batch BAD (0: none); files
  # above FSIZE bytes (0: no limit) fail with EFBIG, as on a full disk, even for root.
  from medjax import cli
  bad, fsize = int(sys.argv[1]), int(sys.argv[2])
  if fsize:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
  if bad:
    make = from_config.make_data

    def poisoned(*a, **k):
      it, val = make(*a, **k)
      return _Poisoned(it, bad), val

    from_config.make_data = poisoned
  sys.exit(cli.main(sys.argv[3:]))


def test_retention_keeps_the_newest_and_the_best_across_restarts(tmp_path):
  """keep=1: the newest step and the lowest validation loss survive; steps saved without a
  val loss never count as best; a restarted run still knows which step was best."""
  import jax.numpy as jnp

  def state(i):
    return {"step": jnp.int32(i), "params": {"w": jnp.full((4,), float(i))}}

  def run(steps_and_losses):
    ck = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
    for step, val in steps_and_losses:
      ck.save(step, state(step), {}, {} if val is None else {"val_loss": val})
    ck.close()
    return sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())

  assert run([(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 4.0)]) == [2, 5]
  assert run([(6, None), (7, 5.0)]) == [2, 7]  # step 2's loss came back from disk
  assert run([(8, 0.5), (9, None)]) == [8, 9]
