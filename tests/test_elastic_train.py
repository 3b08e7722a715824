"""End to end: `medjax train` checkpointed as 2 processes x 4 CPU devices resumes as 1 process
x 8 devices with the losses and mixture fractions of an uninterrupted 1 x 8 run (the data
position is global; the realized replay fraction is summed over processes).

Four `medjax train` processes (~1 min on 2 shared cores), so it runs only with
MEDJAX_SLOW_TESTS=1; `tests/test_tokenized.py::test_elastic_resume_2x4_1x8_4x2` checks the
same global batches through the data pipeline in CI.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medjax import cli

pytestmark = pytest.mark.skipif(os.environ.get("MEDJAX_SLOW_TESTS") != "1",
                                reason="4 training processes; set MEDJAX_SLOW_TESTS=1")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpt.py"
TOKENIZER = "asset:tinystories-260k/tokenizer.model"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(workdir, built, steps, devices, process=None):
  """A `medjax train` process; process = (id, count, port) for a multi-process run."""
  cmd = [sys.executable, "-m", "medjax.cli", "train", "--config", str(CONFIG), "--workdir",
         str(workdir)]
  if process:
    cmd += ["--coordinator", f"localhost:{process[2]}", "--num-processes", str(process[1]),
            "--process-id", str(process[0])]
  o = {"init_from": "", "model": "tiny", "data.train": f"tfds:{built}",
       "data.replay": "asset:tinystories_sample.txt", "data.replay_weight": 0.25,
       "data.seq_len": 32, "batch_size": 8, "total_steps": steps, "log_every": 1,
       "checkpoint_every": 2, "eval_every": 0, "eval.text": "", "data.tokenizer": TOKENIZER}
  cmd += [f"--config.{k}={v}" for k, v in o.items()]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait(p):
  try:
    out, _ = p.communicate(timeout=400)
  except subprocess.TimeoutExpired:
    p.kill()
    out, _ = p.communicate()
  assert p.returncode == 0, out[-3000:]


def _losses(workdir):
  recs = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  return {r["step"]: (r["loss"], r["mix/replay"]) for r in recs if "loss" in r}


def test_two_processes_resume_as_one(tmp_path):
  from medjax.assets import asset_path
  built = tmp_path / "built"
  assert cli.main(["data", "build", "medical_text", "--input",
                   str(asset_path("medical_text_sample.csv")), "--out", str(built),
                   "--tokenizer", TOKENIZER, "--seq-len", "64", "--workers", "1"]) == 0
  port = _free_port()
  a = [_train(tmp_path / "a", built, 2, 4, (i, 2, port)) for i in range(2)]
  ref = _train(tmp_path / "ref", built, 4, 8)
  for p in a + [ref]:
    _wait(p)
  # The checkpoint written by the 2 processes holds a global position.
  saved = json.loads((tmp_path / "a" / "checkpoints" / "2" / "data" / "metadata").read_text())
  assert saved == {"global_batch": 2, "global_sample": 16, "batch_size": 8}
  _wait(_train(tmp_path / "a", built, 4, 8))  # resumes from step 2 as one process
  got, want = _losses(tmp_path / "a"), _losses(tmp_path / "ref")
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert len({loss for loss, _ in want.values()}) == 4  # four different batches
  # The realized replay share of the trained tokens, summed over the processes.
  assert all(0.15 < mix < 0.35 for _, mix in got.values())
