"""The flash-style XLA attention equals the reference einsum attention, values and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.model import attention
from medjax.model import llama as model


def _case(b, t, n, k, h, dtype, seed=0):
  r = np.random.default_rng(seed)
  q, kk, v = (jnp.asarray(r.standard_normal((b, t, m, h)), dtype) for m in (n, k, k))
  # Packed segments, and left padding (segment 0) on the first row.
  seg = np.sort(r.integers(1, 4, (b, t)), axis=1)
  seg[0, : t // 5] = 0
  return q, kk, v, jnp.asarray(seg, jnp.int32)


_reference = model.reference_attention


@pytest.mark.parametrize("b,t,n,k,h,on_cpu,chunk_bytes", [
    (2, 100, 4, 2, 8, True, None),       # T not a multiple of the block, GQA
    (3, 96, 8, 4, 8, True, 8 * 1024),    # several chunks walked by lax.map
    (2, 20, 4, 4, 16, True, None),       # shorter than one block
    (2, 160, 4, 1, 64, False, None),     # the non-CPU path (no chunks, 128-row blocks)
])
def test_flash_matches_reference(monkeypatch, b, t, n, k, h, on_cpu, chunk_bytes):
  if chunk_bytes:
    monkeypatch.setattr(attention, "CPU_CHUNK_BYTES", chunk_bytes)
    assert attention._chunk(b * k, n // k, attention.query_block(h, True), t) < b * k
  q, kk, v, seg = _case(b, t, n, k, h, jnp.float32)
  scale = h ** -0.5
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  ref_fn = lambda q, k, v: jnp.sum(_reference(q, k, v, seg, scale) * w)
  got_fn = jax.jit(lambda q, k, v: jnp.sum(
      attention.flash_attention(q, k, v, seg, scale, on_cpu=on_cpu) * w))
  out = jax.jit(lambda q, k, v: attention.flash_attention(q, k, v, seg, scale,
                                                          on_cpu=on_cpu))(q, kk, v)
  np.testing.assert_allclose(out, _reference(q, kk, v, seg, scale), atol=2e-5, rtol=0)
  for g_ref, g in zip(jax.grad(ref_fn, (0, 1, 2))(q, kk, v),
                      jax.grad(got_fn, (0, 1, 2))(q, kk, v)):
    scale_ref = float(jnp.abs(g_ref).max())
    assert float(jnp.abs(g - g_ref).max()) <= 1e-5 * max(scale_ref, 1.0)


def test_flash_bf16_close_to_f32():
  q, kk, v, seg = _case(2, 64, 4, 2, 16, jnp.float32)
  ref = _reference(q, kk, v, seg, 0.25)
  low = attention.flash_attention(*(x.astype(jnp.bfloat16) for x in (q, kk, v)), seg, 0.25)
  assert low.dtype == jnp.bfloat16
  err = float(jnp.abs(low.astype(jnp.float32) - ref).max())
  assert 0 < err < 0.05, err


def test_model_uses_flash_in_full_passes(monkeypatch):
  # The training/scoring forward goes through flash_attention, never the [B,1,T,S] mask.
  from medjax.model import config
  cfg = config.preset("tiny")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  calls = []
  real = attention.flash_attention
  monkeypatch.setattr(attention, "flash_attention",
                      lambda *a, **kw: calls.append(a[3].shape) or real(*a, **kw))
  model.forward(cfg, params, jnp.ones((2, 12), jnp.int32))
  assert calls == [(2, 12)] * cfg.num_hidden_layers


def test_segment_starts():
  seg = jnp.array([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3], [1, 2, 2, 1, 1, 1]])
  # A recurring id after another id starts a new segment (documented in flash_attention).
  assert attention.segment_starts(seg).tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6,
                                                    [0, 1, 1, 3, 3, 3]]
