"""Training: loss falls, exact resume after SIGTERM, accumulation, masking, LoRA, NaN guard."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax.model import config
from medjax.model import lora
from medjax.model import llama as model
from medjax.assets import resolve
from medjax.training import config as runconfig
from medjax.training import loop as train
from medjax.training import optim
from medjax.training import state as state_lib
from medjax.training import step as ts
from medjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OC = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, total_steps=10, final_lr_ratio=0.1,
                                    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def _overrides(tmp_path, steps=8, **kw):
  corpus = tmp_path / "corpus.txt"
  if not corpus.exists():
    rng = np.random.default_rng(0)
    words = ["fever", "cough", "heart", "blood", "lung", "pain", "doctor", "the", "a", "is"]
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(60)))
  o = {"init_from": "", "model": "tiny", "data.train": str(corpus), "data.replay": "",
       "data.seq_len": 64, "batch_size": 4, "total_steps": steps, "log_every": 1,
       "checkpoint_every": 3, "eval_every": 0, "eval.text": "", "optim.warmup_steps": 2,
       "data.tokenizer": "asset:tinystories-260k/tokenizer.model"}
  o.update(kw)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


def test_loss_falls_and_workdir_is_loadable(tmp_path):
  c = runconfig.load(str(CONFIGS / "tiny_cpt.py"), _overrides(tmp_path, steps=12))
  train.main(c, str(tmp_path / "w"))
  losses = _losses(tmp_path / "w")
  assert losses[12] < losses[1] - 0.5, losses
  assert json.load(open(tmp_path / "w" / "run_config.json"))["total_steps"] == 12
  import medjax
  m = medjax.load(str(tmp_path / "w"))
  assert m(np.ones((1, 4), np.int32)).shape == (1, 4, 512)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
  """Uninterrupted run vs a run SIGTERMed mid-way and restarted: identical losses.

  The signal goes out once 3 of 40 steps are logged, so it lands mid-run (asserted: the run
  stops early, says so, and leaves a checkpoint at the step it reached)."""
  steps = 40
  args = [sys.executable, "-m", "medjax.cli", "train", "--config", str(CONFIGS / "tiny_cpt.py")]
  ov = _overrides(tmp_path, steps=steps, checkpoint_every=100)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(args + ["--workdir", str(tmp_path / "a")] + ov, check=True, env=env,
                 capture_output=True, timeout=300)
  p = subprocess.Popen(args + ["--workdir", str(tmp_path / "b")] + ov, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  mfile = tmp_path / "b" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (mfile.exists() and mfile.read_text().count("\n") >= 3):
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=120)[0].decode()
  assert p.returncode == 0, out
  stopped = max(_losses(tmp_path / "b"))
  assert 3 <= stopped < steps, (stopped, out)
  assert f"SIGTERM: checkpoint at step {stopped} written" in out
  assert sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints")
                if d.isdigit()) == [stopped]
  r = subprocess.run(args + ["--workdir", str(tmp_path / "b")] + ov, env=env,
                     capture_output=True, timeout=300, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resumed" in r.stdout
  # Restore and saves log no orbax noise (`checkpoints.orbax_logs`): no absl warning at all.
  assert "WARNING:absl" not in r.stdout + r.stderr, r.stderr
  a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == list(range(1, steps + 1))
  assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical on CPU


def _batch(b=8, t=16, seed=0, vocab=512):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1))
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  return {"inputs": jnp.asarray(tok[:, :-1], jnp.int32), "targets": jnp.asarray(tok[:, 1:],
                                                                              jnp.int32),
          "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}


def _step(cfg, accum=1, params=None):
  params = params if params is not None else model.init_params(cfg, jax.random.PRNGKey(0))
  opt, sched = optim.make_optimizer(OC, cfg, params)
  state = state_lib.init_state(params, opt, 0)
  fn = jax.jit(functools.partial(ts.train_step, cfg=cfg, optimizer=opt, schedule=sched,
                                 accum_steps=accum))
  return state, fn


def test_gradient_accumulation_equals_large_batch():
  """4 micro-batches give the large batch's loss and gradient (SGD with lr 1: the update is
  the gradient, so params compare gradients; Adam would amplify rounding near zero)."""
  import optax
  cfg = config.preset("tiny", scan_layers=True)
  batch = _batch()
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.sgd(1.0)
  sched = lambda step: 1.0
  out = []
  for accum in (1, 4):
    fn = jax.jit(functools.partial(ts.train_step, cfg=cfg, optimizer=opt, schedule=sched,
                                   accum_steps=accum))
    out.append(fn(state_lib.init_state(params, opt, 0), batch))
  (s1, m1), (s4, m4) = out
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) < 1e-5
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    assert float(jnp.abs(a - b).max()) < 1e-5


def test_masked_targets_do_not_change_loss():
  """SFT: targets where loss_mask is 0 (the prompt) do not affect the loss."""
  cfg = config.preset("tiny")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  b = _batch()
  b2 = dict(b, targets=jnp.where(b["loss_mask"] > 0, b["targets"], (b["targets"] + 7) % 512))
  l1, n1 = ts.loss_sums(params, b, cfg)
  l2, n2 = ts.loss_sums(params, b2, cfg)
  assert float(l1) == float(l2) and float(n1) == float(b["loss_mask"].sum())
  b3 = dict(b, targets=(b["targets"] + 7) % 512)  # changing counted targets does change it
  assert float(ts.loss_sums(params, b3, cfg)[0]) != float(l1)


def test_lora_trains_only_adapters():
  cfg = config.preset("tiny", scan_layers=True)
  base = model.init_params(cfg, jax.random.PRNGKey(0))
  lcfg = cfg.replace(lora_rank=4, lora_targets=("q", "v", "down"))
  params = lora.add_adapters(base, lcfg, jax.random.PRNGKey(1))
  state, fn = _step(lcfg, 1, params)
  for _ in range(3):
    state, m = fn(state, _batch())
  from medjax.model.params import flatten
  before, after = flatten(params), flatten(state["params"])
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(lora.is_lora_path(k) for k in changed), changed
  assert any(k.endswith("lora_b") for k in changed)


def test_nan_batch_is_skipped_not_applied():
  cfg = config.preset("tiny")
  state, fn = _step(cfg)
  before = jax.tree.map(np.asarray, state["params"])
  bad = dict(_batch(), loss_mask=_batch()["loss_mask"].at[0, 0].set(jnp.nan))
  state, m = fn(state, bad)
  assert not bool(m["finite"]) and int(state["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
    assert np.array_equal(a, np.asarray(b))
  state, m = fn(state, _batch())  # training continues with the next good batch
  assert bool(m["finite"]) and int(state["skipped"]) == 1


@pytest.mark.parametrize("override,needle", [
    ("--config.totl_steps=3", "totl_steps"),
    ("--config.total_steps=abc", "total_steps"),
    ("--config.optim.lrr=1", "lrr"),
])
def test_config_errors_name_the_field(override, needle):
  with pytest.raises(ConfigError, match=needle):
    runconfig.load(str(CONFIGS / "tiny_cpt.py"), [override])


def test_missing_config_file():
  with pytest.raises(ConfigError, match="nope.py: config file not found"):
    runconfig.load("configs/nope.py")


@pytest.mark.parametrize("kw,needle", [
    ({"data.seq_len": 4096}, "max_position_embeddings"),
    ({"batch_size": 3, "accum_steps": 2}, "batch_size=3"),
    ({"mesh.fsdp": 3}, "mesh"),
])
def test_run_config_errors(tmp_path, kw, needle):
  c = runconfig.load(str(CONFIGS / "tiny_cpt.py"), _overrides(tmp_path, **kw))
  with pytest.raises(ConfigError, match=needle):
    train.main(c, str(tmp_path / "w"))


def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, monkeypatch):
  """LoRA: checkpoints leave out the frozen base; resume and load rebuild it from init_from."""
  import shutil
  import medjax
  o = _overrides(tmp_path, steps=6, **{"init_from": "asset:tinystories-260k",
                                       "model_overrides.lora_rank": 4, "optim.lr": 0.01})
  c = lambda: runconfig.load(str(CONFIGS / "tiny_cpt.py"), o)
  a, b = tmp_path / "a", tmp_path / "b"
  train.main(c(), str(a))
  from medjax.checkpoints.modeldir import saved_tree
  from medjax.model.params import flatten
  tree = saved_tree(str(a / "checkpoints" / "6" / "state"))
  saved = flatten(dict(tree["params"]))
  assert saved and all(lora.is_lora_path(k) for k in saved), sorted(saved)[:5]
  train.main(c(), str(b))
  shutil.rmtree(b / "checkpoints" / "6")  # as if killed after step 3's checkpoint
  train.main(c(), str(b))  # resumes at 3: base re-read, adapters + Adam state restored
  assert _losses(a) == _losses(b)
  toks = np.arange(1, 9, dtype=np.int32)[None]
  la, lb = np.asarray(medjax.load(str(a))(toks)), np.asarray(medjax.load(str(b))(toks))
  np.testing.assert_array_equal(la, lb)
  base = np.asarray(medjax.load(str(resolve("asset:tinystories-260k")))(toks))
  assert np.abs(la - base).max() > 1e-3  # the trained adapters are in the merged weights
  # export-hf merges a tensor at a time, the base read from the run's init_from (an HF dir
  # here), never the whole model: the same model as the whole-model restore + merge above.
  from medjax.checkpoints import hf_export
  said = []
  hf_export.export_hf(str(a), str(tmp_path / "hf"), log=said.append)
  assert any("merging LoRA adapters into" in m and "tinystories-260k" in m for m in said), said
  lh = np.asarray(medjax.load(str(tmp_path / "hf"))(toks))
  assert np.abs(lh - la).max() <= 1e-5 * np.abs(la).max(), np.abs(lh - la).max()
  # On a mesh the base is read straight onto the model's shardings (less the adapters'),
  # not whole onto one device first.
  from medjax.checkpoints import hf_import
  from medjax.parallel import sharding
  placed, real = [], hf_import.import_hf

  def spy(*args, shardings_fn=None, **kw):
    fn = shardings_fn and (lambda c: placed.append(shardings_fn(c)) or placed[-1])
    return real(*args, shardings_fn=fn, **kw)

  monkeypatch.setattr(hf_import, "import_hf", spy)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  lm = np.asarray(medjax.load(str(a), mesh=mesh)(toks))
  assert placed and placed[0] is not None
  assert not any(lora.is_lora_path(k) for k in flatten(placed[0]))
  np.testing.assert_allclose(lm, la, rtol=1e-5, atol=1e-5 * np.abs(la).max())


def test_lora_on_a_cpt_workdir_exports_with_the_base_streamed(tmp_path):
  """The recipe's shape: LoRA SFT-style training on a CPT workdir. export-hf reads the base
  from that workdir's newest checkpoint a tensor at a time; same model as `medjax.load`."""
  import medjax
  from medjax.checkpoints import hf_export
  c = lambda **kw: runconfig.load(str(CONFIGS / "tiny_cpt.py"), _overrides(tmp_path, steps=2,
                                                                           **kw))
  train.main(c(init_from="asset:tinystories-260k"), str(tmp_path / "cpt"))
  train.main(c(**{"init_from": str(tmp_path / "cpt"), "model_overrides.lora_rank": 4,
                  "optim.lr": 0.05, "optim.warmup_steps": 0}), str(tmp_path / "lora"))
  said = []
  hf_export.export_hf(str(tmp_path / "lora"), str(tmp_path / "hf"), log=said.append)
  assert any(f"merging LoRA adapters into {tmp_path / 'cpt'}" in m for m in said), said
  toks = np.arange(1, 9, dtype=np.int32)[None]
  want = np.asarray(medjax.load(str(tmp_path / "lora"))(toks))
  cpt = np.asarray(medjax.load(str(tmp_path / "cpt"))(toks))
  assert np.abs(want - cpt).max() > 1e-3  # the adapters matter
  got = np.asarray(medjax.load(str(tmp_path / "hf"))(toks))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()
