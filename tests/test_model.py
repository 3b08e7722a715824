"""Model: parity with transformers, scan/attention variants, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medjax
from medjax.model import config
from medjax.model import llama as model
from hf_fixtures import hf_logits, make_hf_llama, TINYSTORIES

CASES = {
    "mha_untied": dict(heads=4, kv_heads=4, tie=False),
    "gqa_tied": dict(heads=4, kv_heads=2, tie=True),
    "theta_odd_vocab": dict(vocab=101, heads=4, kv_heads=1, rope_theta=500000.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers(tmp_path, case, sharded):
  hf = make_hf_llama(tmp_path, max_shard_size="20KB" if sharded else None, **CASES[case])
  if sharded:
    assert (tmp_path / "model.safetensors.index.json").exists()
  tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 11))
  m = medjax.load(str(tmp_path))
  diff = np.abs(np.asarray(m(tokens)) - hf_logits(hf, tokens)).max()
  assert diff <= 1e-4, diff


def test_padded_and_packed_inputs_match_transformers(tmp_path):
  hf = make_hf_llama(tmp_path, heads=4, kv_heads=2)
  import torch
  m = medjax.load(str(tmp_path))
  rng = np.random.default_rng(1)
  # Left padding: pads get segment 0, positions count real tokens only (as HF generate does).
  tokens = rng.integers(3, 97, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[0, :4] = 0
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    want = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()
  got = np.asarray(m(tokens, segment_ids=jnp.asarray(mask, jnp.int32), positions=jnp.asarray(pos)))
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() <= 1e-4
  # Packing: two documents in one row never see each other and RoPE restarts.
  a, b = rng.integers(3, 97, 5), rng.integers(3, 97, 6)
  row = np.concatenate([a, b])[None]
  seg = np.array([[1] * 5 + [2] * 6], np.int32)
  pos = np.array([list(range(5)) + list(range(6))], np.int32)
  got = np.asarray(m(row, segment_ids=seg, positions=pos))[0]
  assert np.abs(got[:5] - hf_logits(hf, a[None])[0]).max() <= 1e-4
  assert np.abs(got[5:] - hf_logits(hf, b[None])[0]).max() <= 1e-4


def test_real_tinystories_matches_transformers():
  d = TINYSTORIES
  transformers = pytest.importorskip("transformers")
  import torch
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
  tokens = np.array([[1, 403, 407, 261, 378, 432, 383, 286]])
  got = np.asarray(medjax.load(str(d))(tokens))
  assert np.abs(got - hf_logits(hf, tokens)).max() <= 1e-4


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(attention="dot_product"),
                                     dict(scan_layers=True, remat="full"),
                                     dict(remat="dots_saveable")])
def test_variants_agree(variant):
  cfg = config.preset("tiny")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
  ref = model.forward(cfg, params, tokens, segment_ids=seg)
  vcfg = cfg.replace(**variant)
  from medjax.model.params import to_layout
  got = model.forward(vcfg, to_layout(params, vcfg), tokens, segment_ids=seg)
  assert float(jnp.abs(got - ref).max()) <= 1e-5
  # Gradients agree too (remat/scan change the backward pass).
  loss = lambda c, p: jnp.mean(model.forward(c, p, tokens, segment_ids=seg) ** 2)
  g_ref = jax.grad(lambda p: loss(cfg, p))(params)
  g = to_layout(jax.grad(lambda p: loss(vcfg, p))(to_layout(params, vcfg)), cfg)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    assert float(jnp.abs(a - b).max()) <= 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_last_only_is_the_last_slot(tie):
  cfg = config.preset("tiny", tie_word_embeddings=tie)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
  full = model.forward(cfg, params, tokens)
  last = model.forward(cfg, params, tokens, last_only=True)
  assert last.shape == (2, 1, cfg.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-6, rtol=0)
  # With a cache (the prefill case), the cache is still written for every slot.
  cache = model.init_cache(cfg, 2, 12)
  last_c, cache_l = model.forward(cfg, params, tokens, cache=cache, last_only=True)
  _, cache_f = model.forward(cfg, params, tokens, cache=cache)
  np.testing.assert_allclose(last_c, full[:, -1:], atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(cache_l), jax.tree.leaves(cache_f)):
    np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_f32_params():
  cfg = config.preset("tiny", dtype="bfloat16")
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jnp.arange(12).reshape(1, 12)
  lo = model.forward(cfg, params, tokens)
  hi = model.forward(cfg.replace(dtype="float32"), params, tokens)
  assert lo.dtype == jnp.float32
  err = float(jnp.abs(lo - hi).max())
  # bf16 keeps 8 significant bits: one rounding moves a value by up to 2**-8 of itself. The
  # layers accumulate in f32, so the logits should be off by a few roundings of the largest
  # logit (measured 1.2-1.5 of them over three seeds), not by a wrong computation (a bf16
  # master copy of the weights or a dropped residual is off by 10-100x more). 0 < err shows
  # the compute really ran in bf16.
  bound = 4 * 2.0**-8 * float(jnp.abs(hi).max())
  assert 0 < err < bound, (err, bound)


@pytest.mark.parametrize("name,billions", [("llama2-7b", 6.738), ("llama2-13b", 13.016),
                                           ("llama2-70b", 68.977)])
def test_presets_param_counts(name, billions):
  cfg = config.preset(name, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert n == cfg.num_params()
  assert abs(n / 1e9 - billions) < 0.002, n


def test_param_axes_named_on_every_dim():
  cfg = config.preset("tiny", scan_layers=True, lora_rank=2)
  axes = model.param_axes(cfg)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  for a, s in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                  jax.tree.leaves(shapes)):
    assert len(a) == len(s.shape)
  assert axes["layers"]["attn"]["q"]["w"] == ("layers", "embed", "heads", "head_dim")
  assert axes["embedding"] == ("vocab", "embed")
