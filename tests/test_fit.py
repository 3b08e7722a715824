"""`medjax fit`: AOT compile for a TPU topology (libtpu), with a CPU fallback."""

from __future__ import annotations

import importlib.util

import pytest

from medjax import config, fit
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
