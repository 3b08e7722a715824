"""`bench import`: HF -> medjax import of a synthetic model, wall time and peak RSS."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from medjax.bench.common import child_peak_rss

IMPORT_SHAPES = {
    # 16 x (d1024, f2816) layers + 2 x 32000 x 1024 tables = 267M params = 1.07 GB in f32.
    "1gb": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16),
    # The same shapes as Qwen2 (q/k/v biases): import memory must not depend on the family.
    "1gb-qwen2": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                      model_type="qwen2", qkv_bias=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4),
    # 8.6M params per layer-free part + 3.4M per layer: big enough that holding the whole
    # model would show in RSS above the ~60 MiB of orbax/tensorstore working memory.
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8),
}


def write_synthetic_hf(cfg, out_dir: str, shard_bytes: int) -> list[str]:
  """A random HF Llama dir (config.json + f32 safetensors shards), one tensor in memory."""
  import json
  import jax
  import numpy as np
  from medjax.checkpoints import convert, hf_config
  from medjax.model import llama as model_lib
  from medjax.model import params as params_lib
  shapes = params_lib.flatten(jax.eval_shape(
      lambda: model_lib.init_params(cfg.replace(scan_layers=False), jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)

  def get(path):
    if path.endswith("scale"):
      return np.ones(shapes[path].shape, np.float32)
    return rng.standard_normal(shapes[path].shape, dtype=np.float32) * np.float32(0.02)

  os.makedirs(out_dir, exist_ok=True)
  names = convert.write_hf_weights(cfg, out_dir, get, np.float32, shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config.to_hf_dict(cfg), f)
  return [os.path.join(out_dir, n) for n in names]


def bench_import(shape: str, shard_mb: float, workdir: str | None = None,
                 layers: int | None = None, scan: bool = True) -> dict:
  """Writes a synthetic HF checkpoint and times `medjax import-hf` on it in a child process.

  Args:
    shape: an IMPORT_SHAPES name; `layers` overrides its depth.
    shard_mb: HF shard size.
    workdir: where the temporary files go.
    scan: import to the stacked (scanned) layout, whose stacked params grow with depth;
      False stores per-layer params, so the peak should not grow with depth.
  Returns:
    params, param_bytes, shards, write_s, wall_s, peak_rss, baseline_rss, baseline_s,
    ckpt_bytes, log.
  """
  from medjax.model import config as config_lib
  over = {"num_hidden_layers": layers} if layers else {}
  cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **{**IMPORT_SHAPES[shape], **over})
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "medjax")
    t = time.perf_counter()
    shards = write_synthetic_hf(cfg, hf_dir, int(shard_mb * (1 << 20)))
    write_s = time.perf_counter() - t
    sizes = [os.path.getsize(p) for p in shards]
    base_s, base_rss, _ = child_peak_rss(["-c", "import medjax.cli.main, medjax.cli.convert, "
                                                "medjax.checkpoints.hf_import"])
    wall, rss, out = child_peak_rss(["-m", "medjax.cli", "import-hf", hf_dir, out_dir,
                                     *([] if scan else ["--no-scan"])])
    ckpt = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
  return {"params": cfg.num_params(), "param_bytes": 4 * cfg.num_params(), "shards": sizes, "write_s": write_s, "wall_s": wall,
          "peak_rss": rss, "baseline_rss": base_rss, "baseline_s": base_s,
          "ckpt_bytes": ckpt, "scan": scan, "log": out.strip().splitlines()[-1:]}


def import_lines(shape: str, r: dict) -> list[str]:
  def mb(b):
    return f"{b / (1 << 20):.0f} MiB" if b >= 10 << 20 else f"{b / (1 << 20):.2f} MiB"

  big = max(r["shards"])
  return [
      f"synthetic HF Llama '{shape}': {r['params'] / 1e6:.1f}M params, f32, "
      f"{len(r['shards'])} shards ({', '.join(mb(s) for s in r['shards'])}), "
      f"written in {r['write_s']:.1f} s",
      f"import-hf (subprocess, {'scan' if r.get('scan', True) else 'per-layer'} layout): "
      f"{r['wall_s']:.1f} s wall, peak RSS "
      f"{mb(r['peak_rss'])} = {r['peak_rss'] / big:.2f}x the largest shard ({mb(big)})",
      f"  of which python + jax + orbax at rest: {mb(r['baseline_rss'])} "
      f"(import alone {r['baseline_s']:.1f} s); above it: "
      f"{(r['peak_rss'] - r['baseline_rss']) / big:.2f}x the largest shard",
      f"  checkpoint written: {mb(r['ckpt_bytes'])}",
  ]
