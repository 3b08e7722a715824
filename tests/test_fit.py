"""`medjax fit`: AOT compile for a TPU topology (libtpu), with a CPU fallback."""

from __future__ import annotations

import importlib.util

import pytest

from medjax.model import config
from medjax.bench import fit_table
from medjax.training import fit
from medjax.cli import main

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install 'jax[tpu]'): TPU AOT compile unavailable")


def test_parse_topology():
  assert fit.parse_topology("v5p:2x2x1") == ("v5p", (2, 2, 1))
  assert fit.parse_topology("v5e:2x4") == ("v5e", (2, 4))
  with pytest.raises(Exception, match="expected CHIP"):
    fit.parse_topology("v5p-8")


@needs_libtpu
def test_tiny_fits_small_tpu_slice(capsys):
  rc = main(["fit", "--model", "tiny", "--seq-len", "128", "--batch-per-device", "2",
             "--topology", "v5e:2x2", "--mesh", "1,2,2", "--remat", "none"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "FITS" in out and "DOES NOT FIT" not in out and "CPU ESTIMATE" not in out
  assert "layers/attn/q/w          P(None, 'fsdp', 'tensor', None)" in out


@needs_libtpu
def test_report_numbers_on_tpu():
  cfg = config.preset("tiny", scan_layers=False, dtype="bfloat16")
  r = fit.fit_report(cfg, "v5e:2x2", seq_len=128, global_batch=8, mesh_shape=(1, 4, 1))
  assert r["note"] == "" and r["chips"] == 4 and r["fits"]
  # The fp32 train state (params + 2 Adam moments + step/rng) split 4 ways is an argument.
  state = 3 * 4 * cfg.num_params() / 4
  assert state <= r["arguments"] < state * 1.2 + (1 << 20)
  assert r["aliased"] > 0.9 * state  # donated state buffers are reused for the new state
  assert 0 < r["total"] < 1 << 30
  # Unrolled layers, no remat: XLA's count is close to 6N·tokens + attention.
  assert 0.7 < r["xla_flops"] / r["model_flops"] < 1.5
  assert r["ideal_step_s"] == pytest.approx(r["model_flops"] / (4 * 197e12))


@needs_libtpu
def test_too_big_model_does_not_fit(capsys):
  # Wide and shallow (2.24B params; fp32 params + 2 Adam moments = 27 GB) on one 16 GiB v5e
  # chip: XLA:TPU refuses it at compile time, which `fit` reports. Two
  # scanned layers keep the compile short.
  cfg = config.preset("llama2-70b", num_hidden_layers=2, scan_layers=True, dtype="bfloat16",
                      remat="full")
  r = fit.fit_report(cfg, "v5e:1x1", seq_len=512, global_batch=1, mesh_shape=(1, 1, 1))
  assert not r["fits"]
  assert r["state_per_chip"] == pytest.approx(12 * cfg.num_params(), rel=1e-3)
  text = fit.format_report(r)
  assert "DOES NOT FIT" in text and "16.00 GiB HBM" in text
  assert r["total"] > 16 * 2**30


def test_cpu_fallback_reports_estimates():
  # One chip needs one CPU device, which this pytest process has.
  cfg = config.preset("tiny", scan_layers=True)
  r = fit.fit_report(cfg, "v5p:1x1x1", seq_len=64, global_batch=2, cpu=True)
  assert r["note"].startswith("CPU ESTIMATE") and r["chips"] == 1
  assert r["fits"] and r["arguments"] >= 3 * 4 * cfg.num_params()
  assert "memory figures are CPU estimates" in fit.format_report(r)


@needs_libtpu
def test_splash_attention_compiles_for_tpu():
  # Heads split over `tensor` and rows over `fsdp`: the kernel runs under shard_map.
  cfg = config.preset("tiny", scan_layers=True, dtype="bfloat16", remat="full")
  kw = dict(seq_len=256, global_batch=4, mesh_shape=(1, 2, 2))
  r = fit.fit_report(cfg.replace(attention="auto"), "v5e:2x2", **kw)
  assert r["attention"] == "splash" and r["fits"] and r["note"] == ""
  assert r["pallas_kernels"] >= 3  # forward, and the dq and dkv kernels of the backward
  r = fit.fit_report(cfg.replace(attention="einsum"), "v5e:2x2", **kw)
  assert r["attention"] == "einsum" and r["pallas_kernels"] == 0


def test_splash_matches_einsum_on_cpu():
  # On CPU the kernel runs in the Pallas interpreter: same logits and gradients as the
  # einsum path, with packed documents and a padded row, under a (1-device) mesh.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from medjax.model import llama as model
  from medjax.parallel import sharding
  cfg = config.preset("tiny")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 128)))
  seg = jnp.asarray([[1] * 50 + [2] * 78, [0] * 20 + [1] * 108], jnp.int32)
  pos = jnp.asarray([list(range(50)) + list(range(78)), [0] * 20 + list(range(108))], jnp.int32)

  def loss(p, c):
    logits = model.forward(c, p, tokens, segment_ids=seg, positions=pos)
    return jnp.mean(logits[:, :, :64] ** 2), logits

  (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, cfg)
  with sharding.activate(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params,
                                                             cfg.replace(attention="splash"))
  assert float(jnp.abs(got - want).max()) < 1e-5
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    assert float(jnp.abs(a - b).max()) < 1e-5
  # "auto" is the einsum path off TPU; odd lengths always are.
  assert not model.attention_tpu.wanted("auto", 128)
  assert not model.attention_tpu.wanted("splash", 100)


def test_bench_cases_quick():
  rows = fit_table.bench_fit(quick=True)
  assert len(rows) == 1
  r = rows[0]
  for key in ("model", "topology", "batch_per_device", "fits", "per_device_gib", "hbm_gib",
              "compile_s", "remat", "attention", "maxtext"):
    assert key in r, key
  assert r["fits"] and 0 < r["per_device_gib"] < r["hbm_gib"] and r["compile_s"] > 0
  if importlib.util.find_spec("libtpu") is not None:
    assert r["note"] == "" and r["attention"] == "splash" and r["topology"] == "v5e-4 (v5e:2x2)"

