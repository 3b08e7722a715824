"""Sharded training equals single-device training, on 8 fake CPU devices.

The pytest process keeps the 1 CPU device other tests expect, so each multi-device check
runs this file as a script in a subprocess with XLA_FLAGS asking for 8 devices. The worker
writes arrays to an .npz and facts to JSON; the asserts run here, against references
computed in this (single-device) process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from hf_fixtures import make_hf_llama

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4))
OC = types.SimpleNamespace(lr=1e-3, warmup_steps=0, total_steps=10, final_lr_ratio=0.1, b1=0.9,
                           b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def run_with_devices(args, n: int = 8, timeout: int = 300) -> dict:
  """Runs this file's worker with `n` fake CPU devices; returns its JSON answer."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, timeout=timeout,
                     capture_output=True, text=True)
  assert p.returncode == 0, f"worker failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
  return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- shared by both sides


def tiny(scan: bool):
  from medjax.model import config
  return config.preset("tiny", scan_layers=scan)


def make_batch(cfg, b: int = 8, t: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Two packed documents per row, with some masked targets."""
  r = np.random.RandomState(seed)
  seg = np.where(np.arange(t) < t // 2 + 1, 1, 2)[None].repeat(b, 0).astype(np.int32)
  pos = np.concatenate([np.arange(t // 2 + 1), np.arange(t - t // 2 - 1)])[None].repeat(b, 0)
  return {"inputs": r.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
          "targets": r.randint(0, cfg.vocab_size, (b, t)).astype(np.int32),
          "loss_mask": (r.rand(b, t) > 0.2).astype(np.float32),
          "segment_ids": seg, "positions": pos.astype(np.int32)}


def make_opt(cfg):
  import jax
  from medjax.model import llama as model
  from medjax.training import optim
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  return optim.make_optimizer(OC, cfg, shapes)


def mean_loss(params, batch, cfg):
  from medjax.training import step as step_lib
  s, c = step_lib.loss_sums(params, batch, cfg)
  return s / c


def flat_np(tree, prefix: str) -> dict[str, np.ndarray]:
  from medjax.model.params import flatten
  return {f"{prefix}/{k}": np.asarray(v) for k, v in flatten(tree).items()}


# ---------------------------------------------------------------- worker (8 devices)


def work_parity(out: str, mesh_shapes: str):
  """One jitted train step per mesh ("8x1x1,1x8x1,...") and scan mode, with plain SGD(lr=1)
  so that old - new = grads: every mesh in one process (one start-up, not four)."""
  from medjax.training import step as step_lib, state as state_lib
  import jax
  import optax
  from medjax.model import llama as model
  from medjax.parallel import sharding
  arrays, specs = {}, {}
  for mesh_shape, scan in ((m, scan) for m in mesh_shapes.split(",") for scan in (False, True)):
    mesh = sharding.make_mesh(*map(int, mesh_shape.split("x")))
    cfg = tiny(scan)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    before = flat_np(params, "p")
    opt = optax.sgd(1.0)
    state, ssh = state_lib.shard_params_state(params, cfg, opt, mesh)
    step = step_lib.jit_train_step(cfg, opt, optax.constant_schedule(1.0), mesh, ssh)
    state, metrics = step(state, make_batch(cfg))
    tag = f"{mesh_shape}/{'scan' if scan else 'noscan'}"
    arrays[f"{tag}/loss"] = np.asarray(metrics["loss"])
    arrays[f"{tag}/gnorm"] = np.asarray(metrics["grad_norm"])
    for k, v in flat_np(state["params"], "p").items():
      arrays[f"{tag}/grad/{k[2:]}"] = before[k] - v
    if scan:
      specs[mesh_shape] = str(state["params"]["layers"]["attn"]["q"]["w"].sharding.spec)
  np.savez(out, **arrays)
  return {"q_spec": specs}


def work_layout(out: str):
  """Specs the rules give, compile-once, donation, sharded init, the replication check."""
  from medjax.model import params as params_lib
  import jax
  from medjax.model import llama as model
  from medjax.parallel import sharding
  from medjax.training import step as step_lib, state as state_lib
  cfg = tiny(True)
  opt, sched = make_opt(cfg)
  facts = {}
  for shape in ((2, 2, 2), (1, 2, 4), (8, 1, 1)):
    mesh = sharding.make_mesh(*shape)
    name = "x".join(map(str, shape))
    if shape == (2, 2, 2):  # the real thing on one mesh; specs alone on the others (time)
      state, ssh = state_lib.sharded_init(cfg, opt, mesh, seed=3)
    else:
      ssh = state_lib.state_shardings(cfg, opt, mesh)
      state = _abstract(cfg, opt, ssh)
    lines = []
    specs = sharding.describe(ssh, log=lines.append)
    facts[name] = {
        "specs": {k: str(v) for k, v in specs.items()},
        "printed": lines,
        "mu_q": str(ssh["opt_state"][1][0].mu["layers"]["attn"]["q"]["w"].spec),
        "batch": str(sharding.batch_sharding(mesh).spec),
        "actual_q": str(state["params"]["layers"]["attn"]["q"]["w"].sharding.spec),
        "sharded_ok": _check_sharded(state["params"], mesh),
    }
    if shape == (2, 2, 2):
      ref = state_lib.init_state(model.init_params(cfg, jax.random.PRNGKey(3)), opt, 3)
      facts["init_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                   for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state)))
      step = step_lib.jit_train_step(cfg, opt, sched, mesh, ssh)
      old = state
      losses = []
      for i in range(3):
        state, m = step(state, make_batch(cfg, seed=i))
        losses.append(float(m["loss"]))
      facts["compiles"] = step._cache_size()
      facts["donated"] = old["params"]["embedding"].is_deleted()
      facts["losses"] = losses
      facts["step"] = int(state["step"])
      facts["step_q_spec"] = str(state["params"]["layers"]["attn"]["q"]["w"].sharding.spec)
  # A dim the mesh does not divide (mlp=172 over tensor=8) is replicated, and caught.
  mesh = sharding.make_mesh(1, 1, 8)
  ssh = state_lib.state_shardings(cfg, opt, mesh)
  facts["uneven_spec"] = str(ssh["params"]["layers"]["mlp"]["up"]["w"].spec)
  facts["uneven_error"] = _check_sharded(_abstract(cfg, opt, ssh)["params"], mesh)
  # A rules override from config moves a param.
  rules = sharding.parse_rules("embed=;vocab=fsdp+tensor")
  mesh = sharding.make_mesh(1, 2, 4)
  facts["custom_emb"] = str(params_lib.param_shardings(cfg, mesh, rules)["embedding"].spec)
  return facts


def _abstract(cfg, opt, ssh):
  from medjax.training import state as state_lib
  import jax
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_lib.abstract_state(cfg, opt), ssh)


def _check_sharded(params, mesh) -> object:
  from medjax import errors
  from medjax.parallel import sharding
  try:
    return sharding.assert_params_sharded(params, mesh, min_size=1024)
  except errors.ConfigError as e:
    return str(e)


def work_import(out: str, hf_dir: str):
  """import_hf placing each tensor on a (1,2,4) mesh as it is read."""
  from medjax.training import state as state_lib
  from medjax.model import params as params_lib
  import jax
  from medjax.checkpoints import hf_import as hf
  from medjax.parallel import sharding
  mesh = sharding.make_mesh(1, 2, 4)
  arrays, facts = {}, {}
  for scan in (False, True):
    cfg, params = hf.import_hf(hf_dir, scan_layers=scan, log=lambda *a: None,
                               shardings_fn=lambda c: params_lib.param_shardings(c, mesh))
    tag = "scan" if scan else "noscan"
    arrays.update(flat_np(params, tag))
    if not scan:
      want = params_lib.param_shardings(cfg, mesh)
      facts["placed"] = all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in
                            zip(jax.tree.leaves(params), jax.tree.leaves(want)))
      facts["q_spec"] = str(params["layers_0"]["attn"]["q"]["w"].sharding.spec)
    else:
      opt, _ = make_opt(cfg)
      state, ssh = state_lib.shard_params_state(params, cfg, opt, mesh)
      facts["state_placed"] = all(
          a.sharding.is_equivalent_to(w, a.ndim)
          for a, w in zip(jax.tree.leaves(state), jax.tree.leaves(ssh)))
      arrays.update(flat_np(state["params"], "state"))
  np.savez(out, **arrays)
  return facts


# ---------------------------------------------------------------- tests (1 device)


@pytest.fixture(scope="module")
def single_ref():
  """Single-device loss, grads and grad norm, per scan mode."""
  import functools
  import jax
  import optax
  from medjax.model import llama as model
  out = {}
  for scan in (False, True):
    cfg = tiny(scan)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(mean_loss, cfg=cfg)))(
        params, make_batch(cfg))
    out[scan] = {"loss": float(loss), "grads": flat_np(grads, "g"),
                 "gnorm": float(optax.tree.norm(grads))}
  return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  """The parity worker's arrays and facts, every mesh of MESHES in one 8-device process."""
  out = tmp_path_factory.mktemp("parity") / "parity.npz"
  facts = run_with_devices(["parity", out, ",".join("x".join(map(str, m)) for m in MESHES)])
  return np.load(out), facts


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_sharded_loss_and_grads_equal_single_device(parity, single_ref, mesh):
  got, facts = parity
  for scan in (False, True):
    tag, ref = f"{mesh}/{'scan' if scan else 'noscan'}", single_ref[scan]
    np.testing.assert_allclose(got[f"{tag}/loss"], ref["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[f"{tag}/gnorm"], ref["gnorm"], rtol=1e-5, atol=1e-5)
    for k, g in ref["grads"].items():
      np.testing.assert_allclose(got[f"{tag}/grad/{k[2:]}"], g, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{mesh} {tag} {k}")
    assert ref["loss"] > 5.0 and ref["gnorm"] > 0.1  # real numbers: ~log(512), nonzero grads
  # The updated params keep the rules' layout (out_shardings of the step).
  want = {"8x1x1": "P(None, None, None, None)", "1x8x1": "P(None, 'fsdp', None, None)",
          "2x2x2": "P(None, 'fsdp', 'tensor', None)", "1x2x4": "P(None, 'fsdp', 'tensor', None)"}
  assert facts["q_spec"][mesh] == want[mesh]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  return run_with_devices(["layout", tmp_path_factory.mktemp("layout") / "x.npz"])


def test_param_specs_follow_rules(layout):
  s = layout["2x2x2"]["specs"]
  assert s == {
      "embedding": "P('tensor', 'fsdp')",
      "layers/attn/q/w": "P(None, 'fsdp', 'tensor', None)",
      "layers/attn/k/w": "P(None, 'fsdp', 'tensor', None)",
      "layers/attn/o/w": "P(None, 'tensor', None, 'fsdp')",
      "layers/mlp/gate/w": "P(None, 'fsdp', 'tensor')",
      "layers/mlp/down/w": "P(None, 'tensor', 'fsdp')",
      "layers/attn_norm/scale": "P(None, None)",
      "lm_head": "P('fsdp', 'tensor')",
  }
  assert any("layers/attn/q/w" in line and "'fsdp', 'tensor'" in line
             for line in layout["2x2x2"]["printed"])
  # Adam moments follow their params; the arrays really are laid out that way.
  assert layout["2x2x2"]["mu_q"] == s["layers/attn/q/w"]
  assert layout["2x2x2"]["actual_q"] == s["layers/attn/q/w"]
  assert layout["2x2x2"]["batch"] == "P(('data', 'fsdp'), None)"
  assert layout["1x2x4"]["batch"] == "P('fsdp', None)"
  assert layout["1x2x4"]["specs"]["layers/mlp/down/w"] == "P(None, 'tensor', 'fsdp')"
  # Pure data parallel: everything replicated, batch over data.
  assert set(layout["8x1x1"]["specs"].values()) <= {
      "P(None, None)", "P(None, None, None, None)",
      "P(None, None, None)"}
  assert layout["8x1x1"]["batch"] == "P('data', None)"
  assert layout["custom_emb"] == "P(('fsdp', 'tensor'), None)"


def test_replication_check(layout):
  ok = layout["2x2x2"]["sharded_ok"]
  assert isinstance(ok, dict), ok
  assert ok["per_device"] < ok["total"] / 3  # 4-way model parallel, norms replicated
  assert isinstance(layout["1x2x4"]["sharded_ok"], dict)
  assert layout["uneven_spec"] == "P(None, None, None)"  # 172 % 8 != 0
  assert "layers/mlp/up/w" in layout["uneven_error"]
  assert "layers/attn/q/w" not in layout["uneven_error"]  # heads=8 divides: still sharded


def test_sharded_init_and_step_compiles_once(layout):
  import functools
  import jax
  from medjax.model import llama as model
  from medjax.training import step as step_lib, state as state_lib
  cfg = tiny(True)
  opt, sched = make_opt(cfg)
  state = state_lib.init_state(model.init_params(cfg, jax.random.PRNGKey(3)), opt, 3)
  step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, optimizer=opt,
                                   schedule=sched))
  ref = []
  for i in range(3):
    state, m = step(state, make_batch(cfg, seed=i))
    ref.append(float(m["loss"]))
  # AdamW steps on the (2,2,2) mesh follow the single-device run.
  np.testing.assert_allclose(layout["losses"], ref, rtol=1e-5)
  # The same random params as the unsharded init (up to how XLA fuses the normal sampling).
  assert layout["init_max_diff"] < 1e-6
  assert layout["compiles"] == 1
  assert layout["donated"] is True
  assert layout["step"] == 3
  assert layout["step_q_spec"] == "P(None, 'fsdp', 'tensor', None)"
  losses = layout["losses"]
  assert all(np.isfinite(losses)) and losses[0] > 5.0


def test_sharded_import_equals_unsharded(tmp_path):
  from medjax.checkpoints import hf_import as hf
  hf_dir = tmp_path / "hf"
  make_hf_llama(hf_dir, vocab=128, hidden=64, layers=2, heads=8, kv_heads=4, ffn=96)
  out = tmp_path / "imp.npz"
  facts = run_with_devices(["import", out, hf_dir])
  got = np.load(out)
  for scan, tag in ((False, "noscan"), (True, "scan")):
    _, ref = hf.import_hf(str(hf_dir), scan_layers=scan, log=lambda *a: None)
    for k, v in flat_np(ref, tag).items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  for k, v in flat_np(hf.import_hf(str(hf_dir), log=lambda *a: None)[1], "state").items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert facts["placed"] and facts["state_placed"]
  assert facts["q_spec"] == "P('fsdp', 'tensor', None)"


@pytest.mark.parametrize("axes,mesh,shape,rules,want", [
    # batch takes both data-parallel axes; a size-1 tensor axis is dropped from the spec.
    (("batch", "length"), (2, 4, 1), (8, 16), None, (("data", "fsdp"), None)),
    (("embed", "heads", "head_dim"), (1, 4, 1), (64, 8, 8), None, ("fsdp", None, None)),
    (("embed", "heads", "head_dim"), (1, 2, 4), (64, 8, 8), None, ("fsdp", "tensor", None)),
    # an axis that does not divide its dim is skipped, the next one still applies
    (("batch", "length"), (3, 2, 1), (4, 16), None, ("fsdp", None)),
    (("embed", "mlp"), (1, 4, 2), (6, 10), None, (None, "tensor")),
    # two names mapped to one mesh axis: the first rule in the table wins, once
    (("embed", "mlp"), (1, 4, 1), (64, 64), "mlp=fsdp", ("fsdp", None)),
    # no mesh: the table's mapping as flax gives it
    (("batch", "vocab"), None, None, None, (("data", "fsdp"), "tensor")),
])
def test_logical_to_spec(axes, mesh, shape, rules, want):
  """flax assigns mesh axes by rule priority; medjax fits the result to the mesh and shape."""
  from jax.sharding import PartitionSpec as P
  from medjax.parallel import sharding
  m = None if mesh is None else types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, mesh)))
  got = sharding.logical_to_spec(axes, sharding.parse_rules(rules), m, shape)
  assert got == P(*want)


if __name__ == "__main__":
  kind, out, *rest = sys.argv[1:]
  fn = {"parity": work_parity, "layout": work_layout, "import": work_import}[kind]
  print(json.dumps(fn(out, *rest)))
