"""`bench attention`: forward + backward of each attention implementation at one shape.

Two row layouts: one document per row (cuDNN's causal kernel applies) and packed rows of
four documents (cuDNN has no segment ids; medjax's `cudnn` mode then runs the Pallas kernel).
Each implementation's output is compared with the f32 einsum reference on the same inputs
(relative error of the whole tensor); its fwd+bwd time is the median of `reps` calls.
"""

from __future__ import annotations

import time

from medjax.bench.common import fmt_rate, median_of


def _impls(on_gpu: bool):
  import jax
  from medjax.model import attention
  from medjax.model import attention_gpu
  from medjax.model import llama as model

  impls = {
      "einsum reference (XLA)": model.reference_attention,
      "medjax flash (XLA)": lambda q, k, v, seg, s: attention.flash_attention(q, k, v, seg, s),
      "medjax cudnn mode": lambda q, k, v, seg, s: attention_gpu.cudnn_attention(
          q, k, v, seg, s, on_gpu=on_gpu),
  }
  if on_gpu:
    impls["cuDNN, causal only (no segments)"] = lambda q, k, v, seg, s: \
        jax.nn.dot_product_attention(q, k, v, scale=s, is_causal=True, implementation="cudnn")
    impls["Pallas Triton mha (segment ids)"] = attention_gpu.pallas_attention
  return impls


def bench_attention(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
                    dtype: str, reps: int, log=print) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from medjax.model.attention_gpu import is_gpu_target
  on_gpu = is_gpu_target()
  r = np.random.default_rng(0)
  shapes = [(batch, seq, m, head_dim) for m in (heads, kv_heads, kv_heads)]
  q32, k32, v32 = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes)
  w = jnp.asarray(r.standard_normal(shapes[0]), dtype)
  q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
  scale = head_dim ** -0.5
  packed = np.repeat(np.arange(1, 5, dtype=np.int32), -(-seq // 4))[:seq]
  layouts = {"one document per row": jnp.ones((batch, seq), jnp.int32),
             "4 packed documents per row": jnp.asarray(np.tile(packed, (batch, 1)))}
  # Causal attention FLOPs, forward (2 matmuls) + backward (5), upper triangle skipped.
  flops = 7 * batch * heads * seq * seq * head_dim
  rows = []
  impls = _impls(on_gpu)
  for layout, seg in layouts.items():
    ref = np.asarray(jax.jit(impls["einsum reference (XLA)"], static_argnums=4)(
        q32, k32, v32, seg, scale))
    for name, fn in impls.items():
      if "no segments" in name and layout != "one document per row":
        continue  # it would attend across documents
      row = {"layout": layout, "impl": name}
      try:
        f = jax.jit(lambda q, k, v, seg, fn=fn: fn(q, k, v, seg, scale))
        g = jax.jit(jax.grad(lambda q, k, v, seg, f=f: jnp.sum(
            f(q, k, v, seg).astype(jnp.float32) * w), (0, 1, 2)))
        out = np.asarray(f(q, k, v, seg), np.float32)
        row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        t0 = time.perf_counter()
        jax.block_until_ready(g(q, k, v, seg))
        row["compile_s"] = time.perf_counter() - t0
        ts = []
        for _ in range(reps):
          t0 = time.perf_counter()
          jax.block_until_ready(g(q, k, v, seg))
          ts.append(time.perf_counter() - t0)
        row["ms"] = median_of(ts) * 1e3
        row["rate"] = flops / (row["ms"] / 1e3)
      except Exception as e:  # one implementation failing must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      log("measured " + attention_row(row), flush=True)
  return rows


def attention_row(row: dict) -> str:
  head = f"{row['layout']:<27} {row['impl']:<34}"
  if "error" in row:
    return f"{head} failed: {row['error']}"
  return (f"{head} fwd+bwd {row['ms']:9.2f} ms  {fmt_rate(row['rate']):>16}  rel. error vs "
          f"f32 reference {row['rel_err']:.1e}")


def attention_lines(rows: list[dict], batch, seq, heads, kv_heads, head_dim, dtype) -> list:
  return [f"attention fwd+bwd, batch {batch} x seq {seq}, {heads} heads ({kv_heads} kv), "
          f"head dim {head_dim}, {dtype}; FLOP/s count the causal half",
          *(attention_row(r) for r in rows)]
