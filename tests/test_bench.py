"""`medjax bench` runs each subcommand on its smallest shapes and prints its figures.

Benchmarks are not timed here: these tests prove the commands work (and that medjax and
transformers train to the same losses), and print what they measured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from medjax import cli


def _bench(capsys, *argv) -> str:
  assert cli.main(["bench", *argv]) == 0
  out = capsys.readouterr().out
  print(out)  # visible with pytest -s
  return out


def test_train_compare_hf_records(capsys, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  results = tmp_path / "RESULTS.md"
  out = _bench(capsys, "train", "--shape", "tiny", "--compare-hf", "--steps", "5",
               "--block", "2", "--breakdown", "--results", str(results))
  assert "tokens/s" in out and "GFLOP/s" in out and "of XLA peak" in out
  # Blocks [0,1] [2,3] [4]: step 0 is warm-up, 2 and 4 open a block and are timed apart.
  assert "(median of 2)" in out and "first step of each block of 2" in out
  assert "ratio medjax / transformers tokens/s:" in out
  assert "compile" in out  # compilation reported, outside the rates
  # Same weights, data and optimizer: the same losses (f32).
  line = next(ln for ln in out.splitlines() if ln.startswith("mean loss"))
  assert float(line.split("rel. diff ")[1].rstrip("%)")) < 0.1
  text = results.read_text()
  for key in ("## train --shape tiny", "- device:", "- commit:", "- command:", "- date:"):
    assert key in text
  # --breakdown: each part timed alone, in ms, with what the step would be without it.
  assert "where medjax's step goes" in out
  parts = re.findall(r"^  (.+?): (-?[\d.]+) ms \(.*without it would be ([\d.]+)x", out, re.M)
  assert [p[0].split(",")[0] for p in parts] == [
      "embedding", "attention", "the layers' other work (projections", "optimizer update and "
      "the rest of the step (the step less the gradient)"]
  assert float(parts[0][1]) > 0 and float(parts[1][1]) > 0


def test_generate_compare_hf(capsys):
  pytest.importorskip("transformers")
  out = _bench(capsys, "generate", "--shape", "tiny", "--compare-hf", "--new-tokens", "8",
               "--reps", "1", "--no-record")
  assert "new tokens/s" in out and "ratio medjax / transformers tokens/s:" in out
  assert "same greedy ids as transformers: 100% of rows" in out
  floor = re.search(r"weight floor: .* takes ([\d.]+) ms = ([\d.]+) GB/s", out)
  assert floor and float(floor.group(1)) > 0
  assert re.search(r"a decode step at the floor would be [\d.]+x transformers", out)


@pytest.mark.parametrize("scan", [False, True])
def test_weight_floor_reads_every_matmul_weight(scan):
  """The floor's weights are exactly the model's matmul weights (no norms, no embedding
  unless tied), as [in, out] matrices, in both layer layouts; its loop runs."""
  import jax
  import numpy as np
  from medjax.model import config
  from medjax.model import llama as model
  from medjax.bench.generate import WeightFloor, _layer_weights
  cfg = config.PRESETS["tiny"].replace(scan_layers=scan)  # GQA: k/v narrower than q
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  layers = _layer_weights(cfg, params)
  d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.hd
  assert len(layers) == cfg.num_hidden_layers
  assert {n: w.shape for n, w in layers[1].items()} == {
      "q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f),
      "down": (f, d)}
  want = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params)
             if "norm" not in jax.tree_util.keystr(path)
             and "embedding" not in jax.tree_util.keystr(path))
  floor = WeightFloor(cfg, params, batch=2, steps=3)
  assert floor.bytes == want
  floor.run()
  assert floor.read() > 0
  w = params["layers"]["attn"]["q"]["w"][1] if scan else params["layers_1"]["attn"]["q"]["w"]
  np.testing.assert_array_equal(layers[1]["q"], np.asarray(w).reshape(d, -1))


def test_data(capsys):
  out = _bench(capsys, "data", "--seq-len", "128", "--batch-size", "2", "--batches", "5",
               "--no-record")
  rates = {k: int(v.replace(",", "")) for k, v in re.findall(
      r"(tokenize|pipeline|end to end) ([\d,]+) tokens/s", out)}
  assert set(rates) == {"tokenize", "pipeline", "end to end"}, out
  assert all(v > 0 for v in rates.values()), rates
  # End to end includes the tokenization pass, so it cannot beat the pipeline alone.
  assert rates["end to end"] <= rates["pipeline"]


def _mib(out: str, label: str) -> float:
  m = re.search(label + r" ([\d.]+) MiB", out)
  assert m, (label, out)
  return float(m.group(1))


def test_data_corpus_scale(capsys, tmp_path):
  out = _bench(capsys, "data", "--corpus-tokens", "2e5", "--seq-len", "256", "--batch-size",
               "4", "--batches", "2", "--tmp", str(tmp_path), "--no-record")
  built = re.search(r"build: ([\d,]+) tokens in .* peak RSS (\d+) MiB", out)
  assert built and int(built[1].replace(",", "")) > 150_000 and int(built[2]) > 0
  assert re.search(r"first batch \(4 x 256, tfds: build, one process, JAX_PLATFORMS=cpu\): [\d.]+ s", out)
  assert "0 of 1200 eval questions" in out and "tokens/s" in out
  assert not list(tmp_path.iterdir())  # corpus and build removed


def test_import_rss(capsys, tmp_path):
  out = _bench(capsys, "import", "--size", "tiny", "--shard-mb", "0.1", "--tmp",
               str(tmp_path), "--no-record")
  peak, base = _mib(out, "peak RSS"), _mib(out, "at rest:")
  ratio = float(re.search(r"= ([\d.]+)x the largest shard", out).group(1))
  assert peak >= base > 0 and ratio > 0
  # The orbax checkpoint holds the 0.17M f32 params (plus small metadata files).
  assert 0.6 <= _mib(out, "checkpoint written:") <= 1.2, out


def test_import_peak_does_not_grow_with_depth(tmp_path):
  """Per-layer import streams one tensor at a time: 2 -> 8 layers adds 80 MiB of weights
  (the whole model grows from 42 to 122 MiB) but must add far less to the peak RSS."""
  from medjax.bench.hf_import import bench_import
  r = {n: bench_import("small", 40, str(tmp_path), layers=n, scan=False) for n in (2, 8)}
  grew = {n: x["peak_rss"] - x["baseline_rss"] for n, x in r.items()}
  more_weights = r[8]["param_bytes"] - r[2]["param_bytes"]
  assert more_weights > 75 << 20
  assert grew[8] - grew[2] < 0.35 * more_weights, (grew, more_weights)


def test_lora_export_streams_the_base(tmp_path):
  """A LoRA workdir (adapters only) exported with its base streamed from init_from equals
  the whole-model restore + merge, the adapters change the weights, and the streamed export
  holds less (at the tiny shape, jax's restore machinery alone is ~150 MiB more)."""
  from medjax.bench.hf_import import bench_lora_export
  r = bench_lora_export(["tiny"], 4, str(tmp_path), "float32")[0]
  assert r["moved"] > 1e-3, r  # two training steps moved the adapters
  assert r["max_diff"] <= 1e-6 * max(r["moved"], 1.0), r
  assert 0 < r["stream_rss"] < r["whole_rss"] - (30 << 20), r


def test_scaling(capsys):
  out = _bench(capsys, "scaling", "--shape", "tiny", "--seqs", "32,64", "--widths", "32",
               "--tokens-per-step", "128", "--steps", "2", "--no-record")
  rows = [ln for ln in out.splitlines() if ln.startswith("|") and "---" not in ln]
  assert len(rows) == 1 + 3  # header + 2 lengths + 1 width


def test_fit_quick():
  """In a fresh process: `fit` needs its (TPU or CPU stand-in) devices before jax starts.
  Without libtpu the figures are CPU estimates, and the report says so."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "medjax.cli", "bench", "fit", "--quick",
                      "--no-record"], capture_output=True, text=True, env=env, timeout=600)
  print(p.stdout)
  assert p.returncode == 0, p.stderr[-2000:]
  row = [ln for ln in p.stdout.splitlines() if ln.startswith("| tiny seq 256")]
  assert len(row) == 1, p.stdout
  cells = [c.strip() for c in row[0].strip("|").split("|")]
  assert cells[7] == "yes" and cells[4].endswith("GiB") and float(cells[4].split()[0]) > 0
  assert re.fullmatch(r"\d+ s / \d+ s", cells[8]), cells


def test_attention(capsys):
  # On CPU: the reference, medjax's flash and the cudnn mode (its XLA stand-in), each layout.
  out = _bench(capsys, "attention", "--seq-len", "128", "--heads", "4", "--kv-heads", "2",
               "--head-dim", "16", "--reps", "2", "--no-record")
  rows = [ln for ln in out.splitlines() if " ms " in ln and not ln.startswith("measured")]
  assert len(rows) == 6 and "failed" not in out, out
  for ln in rows:  # bf16 against the f32 reference: ~4e-3; a wrong mask is O(1)
    assert float(ln.rsplit(" ", 1)[1]) < 1.5e-2, ln


def test_gpu_shape_on_cpu():
  import argparse
  from medjax.bench import models
  args = argparse.Namespace(width=None, layers=2, attention=None, dtype=None, batch=None,
                            seq_len=None)
  s = models.make_shape("7b", args)
  assert (s["cfg"].hidden_size, s["cfg"].intermediate_size, s["cfg"].num_hidden_layers) == \
      (4096, 11008, 2)
  assert (s["batch"], s["seq"], s["cfg"].dtype, s["cfg"].attention) == \
      (1, 4096, "float32", "einsum")  # CPU defaults; bf16 and auto attention off CPU
  assert models.optim_config(10, s["lr"]).lr == 3e-4 and models.optim_config(10).lr == 3e-3
