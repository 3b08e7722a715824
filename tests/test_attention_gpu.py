"""`attention='cudnn'`: the branch chosen per batch, and each branch's values and gradients
against the reference. On CPU the cuDNN branches run jax's XLA implementation of the same
call (`implementation='xla'`), so this checks the dispatch and the masking arguments; the
kernel itself only runs on a GPU (`medjax bench attention`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.model import attention
from medjax.model import attention_gpu
from medjax.model import config
from medjax.model import llama as model
from medjax.errors import ConfigError

T = 24


def _ids(kind: str, b: int = 2):
  ids = np.ones((b, T), np.int32)
  if kind == "padded":
    ids[0, 17:] = 0
    ids[1, 5:] = 0
  elif kind == "packed":
    ids[0, 9:] = 2
    ids[1, 20:] = 0
  elif kind == "left_pad":  # padding first: not "one document from slot 0"
    ids[0, :4] = 0
  return jnp.asarray(ids)


@pytest.mark.parametrize("kind,branch", [("full", 0), ("padded", 1), ("packed", 2),
                                         ("left_pad", 2)])
def test_row_layout(kind, branch):
  got, lengths = attention_gpu.row_layout(_ids(kind))
  assert int(got) == branch
  assert lengths.tolist() == np.sum(np.asarray(_ids(kind)) != 0, axis=1).tolist()


@pytest.mark.parametrize("kind", ["full", "padded", "packed", "left_pad"])
def test_cudnn_mode_matches_reference_on_real_tokens(kind):
  r = np.random.default_rng(0)
  b, n, k, h = 2, 4, 2, 8  # GQA
  q, kk, v = (jnp.asarray(r.standard_normal((b, T, m, h)), jnp.float32) for m in (n, k, k))
  seg = _ids(kind)
  scale = h ** -0.5
  real = np.asarray(seg != 0)[:, :, None, None]
  w = jnp.asarray(r.standard_normal(q.shape), jnp.float32) * real  # loss on real tokens
  ref = lambda q, k, v: model.reference_attention(q, k, v, seg, scale)
  got = jax.jit(lambda q, k, v: attention_gpu.cudnn_attention(q, k, v, seg, scale,
                                                              on_gpu=False))
  out, want = got(q, kk, v), ref(q, kk, v)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=2e-5)
  assert np.all(np.isfinite(out))
  if kind == "padded":  # padding slots are zeros on this branch, as cuDNN leaves them
    assert float(jnp.abs(jnp.where(real, 0, out)).max()) == 0.0
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), (0, 1, 2))(q, kk, v)
  g_got = jax.grad(lambda *a: jnp.sum(got(*a) * w), (0, 1, 2))(q, kk, v)
  for a, e in zip(g_got, g_ref):
    assert float(jnp.abs(a - e).max()) <= 1e-5 * max(float(jnp.abs(e).max()), 1.0)


def test_cudnn_mode_in_the_model_equals_einsum_mode():
  cfg = config.preset("tiny")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 3, cfg.vocab_size)
  seg = _ids("packed")
  want = model.forward(cfg, params, tokens, segment_ids=seg)
  got = model.forward(cfg.replace(attention="cudnn"), params, tokens, segment_ids=seg)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_auto_picks_cudnn_only_for_gpu_half_precision():
  assert attention_gpu.wanted("auto", jnp.bfloat16, 128, on_gpu=True)
  assert not attention_gpu.wanted("auto", jnp.float32, 128, on_gpu=True)
  assert not attention_gpu.wanted("auto", jnp.bfloat16, 128, on_gpu=False)
  assert not attention_gpu.wanted("auto", jnp.bfloat16, 256, on_gpu=True)
  assert attention_gpu.wanted("cudnn", jnp.float32, 64, on_gpu=False)
  assert not attention_gpu.wanted("einsum", jnp.bfloat16, 64, on_gpu=True)


def test_cudnn_on_gpu_needs_half_precision():
  q = jnp.zeros((1, 8, 2, 8), jnp.float32)
  with pytest.raises(ConfigError, match="bfloat16"):
    attention_gpu.cudnn_attention(q, q, q, jnp.ones((1, 8), jnp.int32), 1.0, on_gpu=True)


def test_packed_branch_is_flash(monkeypatch):
  calls = []
  real = attention.flash_attention
  monkeypatch.setattr(attention, "flash_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  q = jnp.ones((2, T, 2, 8), jnp.float32)
  attention_gpu.cudnn_attention(q, q, q, _ids("packed"), 1.0, on_gpu=False)
  assert calls == [1]  # traced once inside the switch


def test_pallas_kernel_matches_reference_interpreted():
  # The packed branch's GPU kernel, run by the Pallas interpreter on CPU: GQA, packed
  # documents, padding (id 0 attends among itself, as the reference).
  r = np.random.default_rng(2)
  b, t, n, k, h = 2, 128, 4, 2, 16
  q, kk, v = (jnp.asarray(r.standard_normal((b, t, m, h)), jnp.float32) for m in (n, k, k))
  seg = np.repeat(np.arange(1, 5, dtype=np.int32), 32)[None].repeat(b, 0)
  seg[1, 100:] = 0
  seg = jnp.asarray(seg)
  w = jnp.asarray(r.standard_normal(q.shape), jnp.float32)
  ref = lambda q, k, v: jnp.sum(model.reference_attention(q, k, v, seg, 0.25) * w)
  got = lambda q, k, v: jnp.sum(
      attention_gpu.pallas_attention(q, k, v, seg, 0.25, interpret=True) * w)
  np.testing.assert_allclose(
      attention_gpu.pallas_attention(q, kk, v, seg, 0.25, interpret=True),
      model.reference_attention(q, kk, v, seg, 0.25), atol=2e-5)
  for a, e in zip(jax.grad(got, (0, 1, 2))(q, kk, v), jax.grad(ref, (0, 1, 2))(q, kk, v)):
    assert float(jnp.abs(a - e).max()) <= 1e-4 * max(float(jnp.abs(e).max()), 1.0)
