"""Sharded evaluation and generation equal one device's: `medjax eval` (CMExam loglik,
perplexity), `medjax generate` and `medjax.load(..., mesh=...)` on 8 CPU devices (mesh
2,2,2) and as 2 processes x 4 devices (default mesh: every device on fsdp), against the same
commands on the pytest process's single device.

Each sharded run is this file as a script (`_worker`), running the commands in turn inside
one process, as `medjax` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medjax.assets import resolve

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a"
TOKENS = [[1, 415, 250, 263, 93, 298, 27], [1, 90, 251, 263, 31, 7, 8]]


def commands(out: Path, extra=()) -> list[list[str]]:
  ckpt = resolve("asset:tinystories-260k")
  return [
      ["eval", "--checkpoint", ckpt, "--cmexam", resolve("asset:cmexam_sample.csv"),
       "--limit", "16", "--batch-size", "8", "--out", str(out / "cmexam.json"), *extra],
      ["eval", "--checkpoint", ckpt, "--text", resolve("asset:tinystories_sample.txt"),
       "--limit", "6", "--batch-size", "4", "--max-len", "64", "--out",
       str(out / "text.json"), *extra],
      ["generate", "--checkpoint", ckpt, "--prompt", PROMPT, "--prompt", "The dog",
       "--max-new-tokens", "12", *extra],
  ]


def _logits(mesh_shape=None, path=None) -> np.ndarray:
  import medjax
  from medjax.parallel import placement, sharding
  mesh = None if mesh_shape is None else sharding.make_mesh(*mesh_shape)
  m = medjax.load(path or resolve("asset:tinystories-260k"), mesh=mesh)
  return placement.fetch(m(np.array(TOKENS, np.int32))), m


def _worker(out: str, mesh: str, *cluster: str) -> None:
  from medjax.cli.main import main
  out_dir = Path(out)
  extra = ["--mesh", mesh]
  if cluster:
    extra += ["--coordinator", cluster[0], "--num-processes", "2", "--process-id", cluster[1]]
  for cmd in commands(out_dir, extra):
    print(f"=== {cmd[0]}", flush=True)
    assert main(cmd) == 0
  import jax
  shape = tuple(int(x) for x in mesh.split(","))
  logits, m = _logits(shape)
  # An import-hf dir stores per-layer arrays; the scanned model stacks them on the mesh.
  stacked, m2 = _logits(shape, str(out_dir.parent / "imported"))
  spec = str(m.params["embedding"].sharding.spec)
  if jax.process_index() == 0:
    np.save(out_dir / "logits.npy", logits)
    np.save(out_dir / "logits_imported.npy", stacked)
  print("=== facts", json.dumps({
      "devices": jax.device_count(), "processes": jax.process_count(), "embedding_spec": spec,
      "stacked_spec": str(m2.params["layers"]["mlp"]["gate"]["w"].sharding.spec)}), flush=True)


def _spawn(out: Path, mesh: str, devices: int, cluster=()):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MEDJAX_WORKER": "1",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  return subprocess.Popen([sys.executable, __file__, str(out), mesh, *cluster], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(p) -> str:
  try:
    out, err = p.communicate(timeout=400)
  except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
  assert p.returncode == 0, out[-2000:] + err[-4000:]
  return out


def _section(stdout: str, name: str) -> str:
  """What the first command called `name` printed (between its marker and the next)."""
  # gloo's connection notes come from C++ and may land mid-line among Python's prints.
  stdout = re.sub(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of "
                  r"connected peer ranks is : \d+\n?", "", stdout)
  lines = stdout.splitlines()
  start = lines.index(f"=== {name}") + 1
  end = next((i for i in range(start, len(lines)) if lines[i].startswith("=== ")), len(lines))
  return "\n".join(lines[start:end])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """Mesh 2,2,2 on 8 devices, and 2 processes x 4 devices, run side by side."""
  root = tmp_path_factory.mktemp("pod_eval")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  for d in ("eight", "two"):
    (root / d).mkdir()
  from medjax.cli.main import main
  assert main(["import-hf", resolve("asset:tinystories-260k"), str(root / "imported")]) == 0
  procs = [_spawn(root / "eight", "2,2,2", 8)] + [
      _spawn(root / "two", "1,-1,1", 4, (f"localhost:{port}", str(i))) for i in range(2)]
  return root, [_done(p) for p in procs]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """The same commands on this process's one device."""
  import contextlib
  import io
  from medjax.cli.main import main
  out = tmp_path_factory.mktemp("one")
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    for cmd in commands(out):
      print(f"=== {cmd[0]}")
      assert main(cmd) == 0
  return out, buf.getvalue(), _logits()[0]


@pytest.mark.parametrize("where", ["eight", "two"])
def test_sharded_eval_and_generate_equal_one_device(sharded, single, where):
  root, stdouts = sharded
  one, one_stdout, one_logits = single
  got = root / where
  a, b = (json.loads((d / "cmexam.json").read_text()) for d in (one, got))
  assert b["n"] == 16 and [p["predicted"] for p in b["predictions"]] == [
      p["predicted"] for p in a["predictions"]]
  assert b["accuracy"] == a["accuracy"]
  a, b = (json.loads((d / "text.json").read_text()) for d in (one, got))
  assert b["tokens"] == a["tokens"] > 100
  assert abs(b["perplexity"] - a["perplexity"]) <= 1e-5 * a["perplexity"]
  out = stdouts[0] if where == "eight" else stdouts[1]
  assert _section(out, "generate") == _section(one_stdout, "generate")
  assert PROMPT in _section(out, "generate")
  np.testing.assert_allclose(np.load(got / "logits.npy"), one_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.load(got / "logits_imported.npy"), one_logits, rtol=1e-5,
                             atol=1e-5)
  facts = json.loads(out.rsplit("=== facts ", 1)[1])
  assert facts["devices"] == 8 and facts["processes"] == (1 if where == "eight" else 2)
  assert "fsdp" in facts["embedding_spec"]  # the params really are sharded
  assert facts["stacked_spec"].startswith("P(None, 'fsdp'")  # [layers, embed, mlp]


def test_only_process_zero_prints_and_writes(sharded):
  _, stdouts = sharded
  p0, p1 = stdouts[1], stdouts[2]
  assert "| all (loglik) | 16 |" in _section(p0, "eval") and PROMPT in _section(p0, "generate")
  assert _section(p1, "eval").strip() == "" and _section(p1, "generate").strip() == "", p1


def test_fit_job_eval_cpu_estimate(capsys):
  """`medjax fit --job eval|generate` compiles those programs as eval/generate jit them; on
  this process's one CPU device (the TPU check itself is in test_fit_job_eval_on_tpu)."""
  from medjax.cli.main import main
  for job in ("eval", "generate"):
    rc = main(["fit", "--job", job, "--model", "tiny", "--topology", "v5p:1x1x1", "--cpu",
               "--seq-len", "64", "--batch-per-device", "2", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and f"medjax fit --job {job}: v5p:1x1x1" in out and "FITS" in out, out
    assert "CPU ESTIMATE" in out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_fit_job_eval_on_tpu():
  """70B-wide layers (2 of them, 2.2B params in f32: 8.3 GiB) scored on v5e:2x2: the params
  are split 4 ways, a quarter per chip, well inside 16 GiB."""
  from medjax.evaluation.fit import eval_fit_report, format_eval_report
  from medjax.model import config
  cfg = config.preset("llama2-70b", num_hidden_layers=2, scan_layers=True, dtype="bfloat16")
  r = eval_fit_report(cfg, "v5e:2x2", 256, 4, (1, 4, 1), job="eval")
  assert r["note"] == "" and r["fits"] and r["mesh"]["fsdp"] == 4
  assert r["params_per_chip"] == pytest.approx(4 * cfg.num_params() / 4, rel=0.01)
  assert r["total"] < 2 * r["params_per_chip"]
  assert "FITS" in format_eval_report(r)


@pytest.mark.parametrize("mesh, want", [
    ("3,1,1", "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not divide the 1 devices"),
    ("1,x,1", "argument --mesh: invalid value '1,x,1': accepts 3 comma-separated ints, each "
              ">= 1 or -1"),
])
def test_bad_mesh_is_one_line(capsys, tmp_path, mesh, want):
  from medjax.cli.main import main
  rc = main(["eval", "--checkpoint", resolve("asset:tinystories-260k"), "--text",
             resolve("asset:tinystories_sample.txt"), "--mesh", mesh,
             "--out", str(tmp_path / "r.json")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and err == [f"medjax eval: error: {want}"], err
  assert not (tmp_path / "r.json").exists()


if __name__ == "__main__":
  _worker(*sys.argv[1:])
