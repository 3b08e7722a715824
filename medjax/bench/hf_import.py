"""`bench import` and `bench export`: HF -> medjax import and medjax -> HF export of a
synthetic model, wall time and peak RSS of each command in its own process."""

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
    # Llama-2-70B's width (d8192, f28672, 64 heads, 8 KV heads), cut to 1 or 3 layers.
    "70b-1": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8),
    "70b-3": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=3, num_attention_heads=64, num_key_value_heads=8),
}


def write_synthetic_hf(cfg, out_dir: str, shard_bytes: int, dtype: str = "float32"
                       ) -> list[str]:
  """A random HF Llama dir (config.json + safetensors shards of `dtype`), one tensor in
  memory."""
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
  np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
  names = convert.write_hf_weights(cfg, out_dir, get, np_dtype, shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config.to_hf_dict(cfg, dtype), f)
  return [os.path.join(out_dir, n) for n in names]


def bench_import(shape: str, shard_mb: float, workdir: str | None = None,
                 layers: int | None = None, scan: bool = True, dtype: str = "float32") -> dict:
  """Writes a synthetic HF checkpoint and times `medjax import-hf` on it in a child process.

  Args:
    shape: an IMPORT_SHAPES name; `layers` overrides its depth.
    shard_mb: HF shard size.
    workdir: where the temporary files go.
    scan: import to the stacked (scanned) layout; False, per-layer params.
    dtype: of the synthetic HF files.
  Returns:
    params, param_bytes, shards, write_s, wall_s, peak_rss, baseline_rss, baseline_s,
    dtype, ckpt_bytes, scan, log.
  """
  from medjax.model import config as config_lib
  over = {"num_hidden_layers": layers} if layers else {}
  cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **{**IMPORT_SHAPES[shape], **over})
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "medjax")
    t = time.perf_counter()
    shards = write_synthetic_hf(cfg, hf_dir, int(shard_mb * (1 << 20)), dtype)
    write_s = time.perf_counter() - t
    sizes = [os.path.getsize(p) for p in shards]
    base_s, base_rss, _ = child_peak_rss(["-c", "import medjax.cli.main, medjax.cli.convert, "
                                                "medjax.checkpoints.hf_import"])
    wall, rss, out = child_peak_rss(["-m", "medjax.cli", "import-hf", hf_dir, out_dir,
                                     *([] if scan else ["--no-scan"])])
    ckpt = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
  return {"params": cfg.num_params(), "param_bytes": 4 * cfg.num_params(), "shards": sizes,
          "write_s": write_s, "wall_s": wall, "peak_rss": rss, "baseline_rss": base_rss,
          "baseline_s": base_s, "dtype": dtype, "ckpt_bytes": ckpt, "scan": scan,
          "log": out.strip().splitlines()[-1:]}


def bench_export(shapes: list[str], shard_mb: float, workdir: str | None = None,
                 dtype: str = "bfloat16") -> list[dict]:
  """For each shape: a synthetic HF dir of `dtype`, `import-hf` of it, then `export-hf` of
  the result back to `dtype`, each command in its own process (peak RSS, wall time)."""
  from medjax.model import config as config_lib
  out = []
  for shape in shapes:
    cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **IMPORT_SHAPES[shape])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
      hf, mj, back = (os.path.join(tmp, d) for d in ("hf", "medjax", "back"))
      shards = write_synthetic_hf(cfg, hf, int(shard_mb * (1 << 20)), dtype)
      imp_s, imp_rss, _ = child_peak_rss(["-m", "medjax.cli", "import-hf", hf, mj])
      exp_s, exp_rss, _ = child_peak_rss(["-m", "medjax.cli", "export-hf", mj, back, "--dtype",
                                          dtype])
      same = _same_files(hf, back)
      ckpt = sum(f.stat().st_size for f in Path(mj).rglob("*") if f.is_file())
      hf_bytes = sum(os.path.getsize(p) for p in shards)
    out.append({"shape": shape, "layers": cfg.num_hidden_layers, "params": cfg.num_params(),
                "largest_tensor": max(cfg.hidden_size * cfg.intermediate_size,
                                      cfg.vocab_size * cfg.hidden_size),
                "hf_bytes": hf_bytes, "ckpt_bytes": ckpt,
                "import_s": imp_s, "import_rss": imp_rss, "export_s": exp_s,
                "export_rss": exp_rss, "round_trip_exact": same, "dtype": dtype})
  base_s, base_rss, _ = child_peak_rss(["-c", "import medjax.cli.main, "
                                        "medjax.checkpoints.hf_import, "
                                        "medjax.checkpoints.hf_export"])
  for r in out:
    r["baseline_rss"] = base_rss
  return out


# The export of a LoRA workdir as it was before the base was streamed: the base rebuilt whole
# (`sources.restore`), merged, then written. The same function export-hf falls back to.
_WHOLE_LORA_EXPORT = r"""
import sys
from medjax.checkpoints import hf_export, sources
sources.lora_base_stream = lambda *a: None
hf_export.export_hf(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
"""


def bench_lora_export(shapes: list[str], rank: int, workdir: str | None = None,
                      dtype: str = "bfloat16") -> list[dict]:
  """For each shape: a synthetic HF dir, `import-hf`, two steps of a real LoRA `medjax train`
  from it (rank `rank`; the checkpoint holds the adapters only), then `export-hf` of that
  workdir twice, each in its own process: merging a tensor at a time with the base streamed
  from init_from, and with the base restored whole first (`_WHOLE_LORA_EXPORT`)."""
  import numpy as np
  from medjax.checkpoints import convert, safetensors_io
  from medjax.model import config as config_lib
  out = []
  for shape in shapes:
    cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **IMPORT_SHAPES[shape])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
      hf, mj, run, a, b = (os.path.join(tmp, d) for d in ("hf", "medjax", "run", "a", "b"))
      write_synthetic_hf(cfg, hf, 4800 << 20, dtype)
      child_peak_rss(["-m", "medjax.cli", "import-hf", hf, mj])
      configs = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpt.py"
      train_s, train_rss, _ = child_peak_rss([
          "-m", "medjax.cli", "train", "--config", str(configs), "--workdir", run,
          f"--config.init_from={mj}", f"--config.model_overrides.lora_rank={rank}",
          "--config.batch_size=1", "--config.data.seq_len=16",
          "--config.data.tokenizer=asset:tinystories-260k/tokenizer.model",
          "--config.eval_every=0", "--config.checkpoint_every=2", "--config.total_steps=2",
          "--config.optim.warmup_steps=0", "--config.optim.lr=0.01"])  # adapters move
      s_s, s_rss, _ = child_peak_rss(["-m", "medjax.cli", "export-hf", run, a, "--dtype", dtype])
      w_s, w_rss, _ = child_peak_rss(["-c", _WHOLE_LORA_EXPORT, run, b, dtype])
      diff = moved = 0.0
      read = lambda d, f, k: safetensors_io.read_tensor(
          os.path.join(d, f), k, *safetensors_io.read_header(os.path.join(d, f))
      ).astype(np.float32)
      base_file = {k: os.path.basename(f) for f in convert.find_weight_files(hf)
                   for k in safetensors_io.read_header(f)[0]}
      for f in convert.find_weight_files(a):
        f = os.path.basename(f)
        for k in safetensors_io.read_header(os.path.join(a, f))[0]:
          x, y = read(a, f, k), read(b, f, k)
          diff = max(diff, float(np.abs(x - y).max()))
          moved = max(moved, float(np.abs(x - read(hf, base_file[k], k)).max()))
    out.append({"shape": shape, "layers": cfg.num_hidden_layers, "params": cfg.num_params(),
                "rank": rank, "dtype": dtype, "train_s": train_s, "train_rss": train_rss,
                "stream_s": s_s, "stream_rss": s_rss, "whole_s": w_s, "whole_rss": w_rss,
                "max_diff": diff, "moved": moved})
  return out


def lora_export_lines(rows: list[dict]) -> list[str]:
  gib = lambda b: f"{b / (1 << 30):.2f} GiB"
  lines = [f"export-hf of a LoRA workdir (rank {rows[0]['rank']}, two real training steps from "
           f"an imported synthetic model; the checkpoint holds adapters only; {rows[0]['dtype']}"
           " out), each command a process of its own",
           "| shape | layers | params | base streamed: wall, peak RSS | base restored whole: "
           "wall, peak RSS | RSS ratio | largest difference between the two | largest change "
           "from the base (the adapters) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['layers']} | {r['params'] / 1e9:.2f}B | "
                 f"{r['stream_s']:.0f} s, {gib(r['stream_rss'])} | {r['whole_s']:.0f} s, "
                 f"{gib(r['whole_rss'])} | {r['stream_rss'] / r['whole_rss']:.2f}x | "
                 f"{r['max_diff']:.3g} | {r['moved']:.3g} |")
  return lines


def _same_files(a: str, b: str) -> bool:
  """Every tensor of HF dir `a` equals `b`'s, bit for bit (read one tensor at a time)."""
  import numpy as np
  from medjax.checkpoints import convert, safetensors_io
  where = {}
  for d in (a, b):
    for f in convert.find_weight_files(d):
      header, start = safetensors_io.read_header(f)
      for name in header:
        where.setdefault(name, []).append((f, header, start))
  return all(len(v) == 2 and np.array_equal(
      safetensors_io.read_tensor(v[0][0], k, *v[0][1:]).view(np.uint8),
      safetensors_io.read_tensor(v[1][0], k, *v[1][1:]).view(np.uint8))
      for k, v in where.items())


def export_lines(rows: list[dict]) -> list[str]:
  gib = lambda b: f"{b / (1 << 30):.2f} GiB"
  lines = [f"import-hf then export-hf of synthetic Llama-2-70B-width checkpoints ({rows[0]['dtype']}"
           f" HF files, f32 medjax params), each command a process of its own; python + "
           f"jax + orbax at rest: {gib(rows[0]['baseline_rss'])} RSS",
           "| layers | params | HF files | medjax ckpt | import wall | import peak RSS | "
           "export wall | export peak RSS | round trip |", "|---:|---:|---:|---:|---:|---:|"
           "---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['layers']} | {r['params'] / 1e9:.2f}B | {gib(r['hf_bytes'])} | "
                 f"{gib(r['ckpt_bytes'])} | {r['import_s']:.0f} s | {gib(r['import_rss'])} | "
                 f"{r['export_s']:.0f} s | {gib(r['export_rss'])} | "
                 f"{'bit-identical' if r['round_trip_exact'] else 'DIFFERS'} |")
  if len(rows) > 1:
    a, b = rows[0], rows[-1]
    lines.append(f"peak RSS, {b['layers']} layers / {a['layers']}: import "
                 f"{b['import_rss'] / a['import_rss']:.2f}x, export "
                 f"{b['export_rss'] / a['export_rss']:.2f}x (model size "
                 f"{b['params'] / a['params']:.2f}x); largest tensor "
                 f"{gib(4 * a['largest_tensor'])} in f32")
  return lines


def import_lines(shape: str, r: dict) -> list[str]:
  def mb(b):
    return f"{b / (1 << 20):.0f} MiB" if b >= 10 << 20 else f"{b / (1 << 20):.2f} MiB"

  big = max(r["shards"])
  return [
      f"synthetic HF Llama '{shape}': {r['params'] / 1e6:.1f}M params, {r.get('dtype', 'f32')}, "
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
