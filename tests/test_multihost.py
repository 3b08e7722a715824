"""2 processes x 4 CPU devices train exactly as 1 process x 8 devices.

Each process is this file run as a script: it joins the others through
`medjax.distributed.initialize` (coordinator on localhost, gloo collectives), loads only its
rows of each global batch (`process_slice`), assembles them with `global_batch`, and runs
3 sharded AdamW steps. The (1,4,2) mesh puts fsdp across the two processes, so parameter
all-gathers and gradient reductions really cross process boundaries.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np

MESH = (1, 4, 2)
STEPS = 3
GLOBAL_BATCH = 8
OC = types.SimpleNamespace(lr=1e-3, warmup_steps=0, total_steps=10, final_lr_ratio=0.1, b1=0.9,
                           b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def global_rows(step: int) -> dict[str, np.ndarray]:
  """The full global batch of a step; each process slices out its own rows."""
  r = np.random.RandomState(step)
  b, t = GLOBAL_BATCH, 16
  return {"inputs": r.randint(0, 512, (b, t)).astype(np.int32),
          "targets": r.randint(0, 512, (b, t)).astype(np.int32),
          "loss_mask": (r.rand(b, t) > 0.2).astype(np.float32)}


def worker(process_id: int, num_processes: int, port: int) -> dict:
  from medjax.parallel import distributed
  joined = distributed.initialize(f"localhost:{port}" if num_processes > 1 else None,
                                  num_processes, process_id)
  import jax
  from medjax.model import config
  from medjax.model import llama as model
  from medjax.parallel import sharding
  from medjax.training import optim, state, step
  cfg = config.preset("tiny", scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  opt, sched = optim.make_optimizer(OC, cfg, shapes)
  mesh = sharding.make_mesh(*MESH)
  state, ssh = state.sharded_init(cfg, opt, mesh, seed=0)
  step = step.jit_train_step(cfg, opt, sched, mesh, ssh)
  bsh = sharding.batch_sharding(mesh)
  rows = distributed.process_slice(GLOBAL_BATCH, bsh)
  losses, norms = [], []
  for i in range(STEPS):
    local = {k: v[rows] for k, v in global_rows(i).items()}
    state, m = step(state, distributed.global_batch(local, mesh, bsh))
    losses.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
  return {"joined": joined, "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "devices": jax.device_count(),
          "rows": [rows.start, rows.stop], "losses": losses, "grad_norms": norms}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _spawn(process_id: int, num_processes: int, devices: int, port: int):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, __file__, str(process_id), str(num_processes),
                           str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(p) -> dict:
  try:
    out, err = p.communicate(timeout=240)
  except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
  assert p.returncode == 0, f"worker failed:\n{out[-2000:]}\n{err[-5000:]}"
  return json.loads(out.strip().splitlines()[-1])


def test_two_processes_match_one_process():
  port = _free_port()
  procs = [_spawn(i, 2, 4, port) for i in range(2)] + [_spawn(0, 1, 8, 0)]
  *multi, single = [_result(p) for p in procs]
  assert single["joined"] is False and single["devices"] == 8
  for i, r in enumerate(multi):
    assert r["joined"] is True
    assert (r["process_count"], r["local_devices"], r["devices"]) == (2, 4, 8)
    # fsdp spans the processes: each loads its half of the global batch.
    assert r["rows"] == [4 * i, 4 * i + 4]
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norms"], single["grad_norms"], rtol=1e-5)
  assert single["rows"] == [0, GLOBAL_BATCH]
  assert single["losses"][0] > 5.0 and min(single["grad_norms"]) > 0.1
  assert len(set(single["losses"])) == STEPS  # three different batches, three updates


if __name__ == "__main__":
  print(json.dumps(worker(*map(int, sys.argv[1:]))))
