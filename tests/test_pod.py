"""The pod path on CPU: the real `medjax train` as 2 processes x 4 devices.

- It trains as 1 process x 8 devices does (files, replay, in-training evals, async
  checkpoints, metrics.jsonl and TensorBoard written once, by process 0).
- A SIGTERM to one process stops both at the same step, checkpointed; a SIGKILL to one
  makes the other exit non-zero with one line within the heartbeat bound; relaunching both
  each time ends with the uninterrupted run's losses, bit for bit.
- Processes given different configs, a coordinator nobody serves, too few processes, a
  process id out of range: one line, exit 1, nothing written.

Each process runs this file as a script (`_main` below), which runs `medjax` exactly as the
console script does; MEDJAX_TEST_STEP_SLEEP slows each step down so that a signal lands
mid-run. All runs share one persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpt.py")
STEPS = 8
HEARTBEAT = 5  # seconds: the bound on noticing a dead peer, small for the test


def _overrides(data: Path, **kw) -> list[str]:
  o = {"init_from": "", "model": "tiny", "data.train": str(data / "corpus.txt"),
       "data.replay": "asset:tinystories_sample.txt", "data.replay_weight": 0.25,
       "data.seq_len": 64, "batch_size": 8, "total_steps": STEPS, "log_every": 1,
       "checkpoint_every": 2, "keep_checkpoints": 2, "eval_every": 4, "eval_batches": 2,
       "eval.text": "asset:tinystories_sample.txt", "eval.text_limit": 4,
       "eval.cmexam": "asset:cmexam_sample.csv", "eval.cmexam_limit": 4,
       "optim.warmup_steps": 2, "data.tokenizer": "asset:tinystories-260k/tokenizer.model"}
  o.update(kw)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(cache: Path, devices: int, sleep: float = 0.0) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "MEDJAX_TEST_STEP_SLEEP": str(sleep),
          "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def launch(workdir: Path, nproc: int, cache: Path, data: Path, extra=(), sleep: float = 0.0,
           ids=None, num=None, overrides=None) -> list[subprocess.Popen]:
  """`medjax train` as `nproc` processes (4 devices each; 1 process: 8 devices)."""
  port = _free_port()
  procs = []
  for i in ids if ids is not None else range(nproc):
    cmd = [sys.executable, __file__, "train", "--config", CONFIG, "--workdir", str(workdir),
           *(overrides[i] if overrides else _overrides(data))]
    if nproc > 1:
      cmd += ["--coordinator", f"localhost:{port}", "--num-processes", str(num or nproc),
              "--process-id", str(i), "--heartbeat-timeout", str(HEARTBEAT), *extra]
    procs.append(subprocess.Popen(cmd, env=_env(cache, 8 if nproc == 1 else 4, sleep),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT))
  return procs


def finish(procs, timeout: float = 400) -> list[tuple[int, str, str]]:
  out = []
  deadline = time.time() + timeout
  for p in procs:
    try:
      o, e = p.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      o, e = p.communicate()
      raise AssertionError(f"hung: {o[-2000:]}\n{e[-3000:]}")
    out.append((p.returncode, o, e))
  return out


def records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records(workdir) if "loss" in r}


def _wait_for_step(workdir: Path, step: int, procs, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / "metrics.jsonl").exists() and max(losses(workdir), default=0) >= step:
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process ended early: {finish(procs)}")
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def pod_dir(tmp_path_factory):
  """A corpus and the shared compilation cache."""
  root = tmp_path_factory.mktemp("pod")
  rng = np.random.default_rng(0)
  words = ["fever", "cough", "heart", "blood", "lung", "pain", "doctor", "the", "a", "is"]
  (root / "corpus.txt").write_text(
      "\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(60)))
  return root, root / "jax_cache"


@pytest.fixture(scope="module")
def runs(pod_dir):
  """The reference runs: 2 processes x 4 devices and 1 process x 8 devices, side by side."""
  root, cache = pod_dir
  procs = launch(root / "two", 2, cache, root) + launch(root / "one", 1, cache, root)
  results = finish(procs)
  for rc, o, e in results:
    assert rc == 0, o[-2000:] + e[-4000:]
  return root, cache, results


def test_two_processes_train_as_one_with_evals_and_checkpoints(runs):
  from medjax.checkpoints import manager
  root, _, results = runs
  two, one = records(root / "two"), records(root / "one")
  # Only process 0 writes: every record once, one TensorBoard file, process 1 prints nothing.
  assert [(r["step"], sorted(r)) for r in two] == [(r["step"], sorted(r)) for r in one]
  assert [r["step"] for r in two if "loss" in r] == list(range(1, STEPS + 1))
  assert len(list((root / "two" / "tb").iterdir())) == 1
  assert "train" not in results[1][1] and "data:" not in results[1][1]
  assert "data:" in results[0][1]
  for a, b in zip(two, one):
    for k in ("loss", "grad_norm", "val_loss", "general_ppl"):
      if k in a:  # reduction order differs between the topologies: not bit-identical
        assert abs(a[k] - b[k]) <= 1e-4 * abs(b[k]), (k, a, b)
    if "cmexam_acc" in a:
      assert a["cmexam_acc"] == b["cmexam_acc"]
  evals = [r for r in two if "val_loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert all("cmexam_acc" in r and "general_ppl" in r for r in evals)
  # Async checkpoints, each process writing its shards; the last restores to the same state.
  steps = sorted(os.listdir(root / "two" / "checkpoints"))
  assert steps == sorted(os.listdir(root / "one" / "checkpoints")) and "8" in steps
  s2, m2 = manager.read_step(str(root / "two" / "checkpoints" / "8"))
  s1, m1 = manager.read_step(str(root / "one" / "checkpoints" / "8"))
  import jax
  flat2, flat1 = jax.tree_util.tree_leaves_with_path(s2), jax.tree_util.tree_leaves_with_path(s1)
  assert [p for p, _ in flat2] == [p for p, _ in flat1] and len(flat2) > 20
  for (path, a), (_, b) in zip(flat2, flat1):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert int(s2["step"]) == 8 and m2["step"] == m1["step"] == 8


def test_export_streams_from_a_two_process_workdir(runs, tmp_path):
  """export-hf reads the 2-process run's newest checkpoint tensor by tensor (one layer at a
  time, each stored in chunks of its own) and writes exactly what it holds; a damaged
  newest checkpoint is named, and the one before is exported."""
  import shutil
  from safetensors.numpy import load_file
  from medjax.checkpoints import hf_export, manager, reader
  root, _, _ = runs
  state, _ = manager.read_step(str(root / "two" / "checkpoints" / "8"))
  arrays = reader.ArrayReader(str(root / "two" / "checkpoints" / "8" / "state"), ("params",))
  chunk = arrays._array("layers/mlp/gate/w").chunk_layout.read_chunk.shape
  assert chunk[0] == 1  # one layer per chunk
  hf_export.export_hf(str(root / "two"), str(tmp_path / "hf"), log=lambda m: None)
  got = load_file(str(tmp_path / "hf" / "model.safetensors"))
  p = state["params"]
  n = p["layers"]["mlp"]["gate"]["w"].shape[0]
  for i in range(n):
    np.testing.assert_array_equal(got[f"model.layers.{i}.mlp.gate_proj.weight"],
                                  np.asarray(p["layers"]["mlp"]["gate"]["w"][i]).T)
  np.testing.assert_array_equal(got["model.embed_tokens.weight"], np.asarray(p["embedding"]))
  w = tmp_path / "damaged"
  shutil.copytree(root / "two", w)
  for d in (w / "checkpoints" / "8" / "state").rglob("d"):  # its array data is gone
    shutil.rmtree(d)
  logs = []
  hf_export.export_hf(str(w), str(tmp_path / "hf6"), log=logs.append)
  assert any(str(w / "checkpoints" / "8") in m and "previous checkpoint" in m for m in logs)
  prev, _ = manager.read_step(str(root / "two" / "checkpoints" / "6"))
  got = load_file(str(tmp_path / "hf6" / "model.safetensors"))
  np.testing.assert_array_equal(got["model.embed_tokens.weight"],
                                np.asarray(prev["params"]["embedding"]))


def test_streamed_fingerprint_equals_the_checkpointed_one():
  """export-hf checks a workdir against its fingerprints one layer at a time: the sums over
  slices equal manager.fingerprint's over the whole array, for each dtype it stores."""
  import jax.numpy as jnp
  from medjax.checkpoints import manager, reader
  rng = np.random.default_rng(0)
  for dtype in (np.float32, jnp.bfloat16, np.int32):
    x = (rng.standard_normal((5, 33, 7)) * 100).astype(dtype)
    fp = reader.Fingerprint()
    for i in range(5):
      fp.add(x[i])
    assert fp.value == int(manager.fingerprint([jnp.asarray(x)])[0])
    y = x.copy()
    y[3, 2, 1] = y[3, 1, 2]  # one moved value
    fp2 = reader.Fingerprint()
    fp2.add(y)
    assert fp2.value != fp.value


def test_sigterm_to_one_process_stops_both_and_a_killed_peer_stops_the_other(runs, tmp_path):
  """SIGTERM to process 1: both checkpoint the same step and exit 0. Relaunched, then
  SIGKILL to process 1: process 0 exits 1 with one line within the heartbeat bound.
  Relaunched again: the uninterrupted 2-process run's losses, bit for bit."""
  root, cache, _ = runs
  w = tmp_path / "w"
  # The reference's config without the in-training evals (they change no loss), to save time.
  noeval = {i: _overrides(root, eval_every=0) for i in range(2)}
  procs = launch(w, 2, cache, root, sleep=0.5, overrides=noeval)
  _wait_for_step(w, 2, procs)
  procs[1].send_signal(signal.SIGTERM)
  res = finish(procs, 200)
  stopped = max(losses(w))
  assert 2 <= stopped < STEPS
  for i, (rc, out, err) in enumerate(res):
    assert rc == 0, err[-3000:]
    assert f"process {i}: SIGTERM: checkpoint at step {stopped} written" in out, out
  assert max(int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()) == stopped

  procs = launch(w, 2, cache, root, sleep=0.5, overrides=noeval)
  _wait_for_step(w, stopped + 1, procs)
  t = time.time()
  procs[1].kill()  # the supervisor: its worker dies with it
  (rc, out, err), _ = finish(procs, 200)
  waited = time.time() - t
  last = err.strip().splitlines()[-1]
  # Seen first either by a collective (gloo: the peer's socket closed) or by the heartbeat.
  assert rc == 1 and last.startswith("medjax train: error: another process of the job "
                                     "stopped ("), err
  assert last.endswith("Rerun every process to resume from the last checkpoint"), last
  assert "Traceback" not in err and "@ 0x" not in err and "Check failure" not in err
  assert waited < HEARTBEAT + 30, waited  # the bound, plus this loaded machine's slack

  res = finish(launch(w, 2, cache, root, overrides=noeval))
  assert all(rc == 0 for rc, _, _ in res), res[0][2][-3000:]
  assert f"resumed from {w / 'checkpoints'}/" in res[0][1]
  assert losses(w) == losses(root / "two")  # bit for bit, every step once


BAD = {
    # name: (launch kwargs, the start of every process's error line)
    "config differs": (dict(lr=[None, "0.002"]), "config differs between processes: "
                       "config.optim.lr is 0.003 on process 0 and 0.002 on process 1"),
    "no coordinator": (dict(ids=[1], extra=["--init-timeout", "3"]),
                       "the job did not form within --init-timeout 3 s"),
    "too few processes": (dict(num=3, extra=["--init-timeout", "3"]),
                          "the job did not form within --init-timeout 3 s"),
    "process id out of range": (dict(ids=[2]), "--process-id 2: must be in [0, 2)"),
    "mesh does not divide": (dict(mesh="3"),
                             "mesh {'data': 1, 'fsdp': 3, 'tensor': 1} does not divide the 8"),
}


def test_bad_multiprocess_input_is_one_line(pod_dir, tmp_path):
  """Each case as its processes would be started on a pod, all cases at once: one line on
  every process, exit 1, within a bounded time, and no workdir."""
  root, cache = pod_dir
  t = time.time()
  jobs = {}
  for name, (kw, _) in BAD.items():
    kw = dict(kw)
    lr, mesh = kw.pop("lr", [None, None]), kw.pop("mesh", None)
    base = _overrides(root) + ([f"--config.mesh.fsdp={mesh}"] if mesh else [])
    kw["overrides"] = {i: base + ([f"--config.optim.lr={lr[i]}"] if i < 2 and lr[i] else [])
                       for i in range(3)}
    w = tmp_path / name.replace(" ", "_")
    jobs[name] = (w, launch(w, 2, cache, root, **kw))
  for name, (w, procs) in jobs.items():
    for rc, out, err in finish(procs, 120):
      last = err.strip().splitlines()[-1] if err.strip() else ""
      assert rc == 1 and last.startswith(f"medjax train: error: {BAD[name][1]}"), (name, err)
      assert "Traceback" not in err and "@ 0x" not in err, (name, err)
    assert not w.exists(), name  # nothing written
  assert time.time() - t < 120


# What jax's runtime printed when a peer stopped (captured from the runs above, trimmed).
FATAL = """E1201 14:31:51.080207   17836 coordination_service.cc:1549] [2634] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.
F1201 14:31:51.080998   17847 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
*** Check failure stack trace: ***
    @     0x7ff6ec90cd5b  std::_Function_handler<>::_M_invoke()
    @     0x7ff6f7ca71f5  (unknown)
"""


def test_supervisor_keeps_output_and_makes_the_runtime_error_one_line():
  import io
  from medjax.parallel import supervisor
  out = io.StringIO()
  f = supervisor._Filter(out)
  text = "mesh {'data': 1}\n" + "train:  10%|#  | 1/10\r" + "[Gloo] Rank 0 is connected\n" + FATAL
  for i in range(0, len(text), 7):  # arbitrary read boundaries
    f.feed(text[i: i + 7])
  f.close()
  assert out.getvalue() == "mesh {'data': 1}\ntrain:  10%|#  | 1/10\r"
  line = supervisor.explain(f.fatal, {"heartbeat_timeout": 7})
  assert line.startswith("another process of the job stopped (process 1 sent no heartbeat for "
                         "--heartbeat-timeout 7 s"), line
  join = ["DEADLINE_EXCEEDED: Deadline Exceeded", "", "RPC: /xla.coordination."
          "CoordinationService/RegisterTask"]
  assert supervisor.explain(join, {"init_timeout": 3, "coordinator": "h:1",
                                   "num_processes": 2}).startswith(
      "the job did not form within --init-timeout 3 s: no coordinator answered at "
      "--coordinator h:1, or fewer than --num-processes 2 processes joined it")
  lost = ["UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task "
          "was preempted/died/restarted unexpectedly"]
  assert supervisor.explain(lost, {"coordinator": "h:1"}).startswith("lost the coordinator h:1")


def _main():
  """One process of a test job: `medjax ARGS`, each training step slowed by
  MEDJAX_TEST_STEP_SLEEP seconds so that a signal can land mid-run."""
  delay = float(os.environ.get("MEDJAX_TEST_STEP_SLEEP", "0") or 0)
  if delay:
    from medjax.parallel import distributed
    real = distributed.global_batch

    def slow(*a, **kw):
      time.sleep(delay)
      return real(*a, **kw)

    distributed.global_batch = slow
  from medjax.cli.main import main
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  _main()
