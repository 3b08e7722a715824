"""Generation: KV-cache parity, greedy parity with transformers, sampling, the real model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medjax
from medjax.evaluation import generate as gen
from medjax.model import llama as model
from hf_fixtures import make_hf_llama, TINYSTORIES

STORIES_PROMPT = [1, 403, 407, 261, 378]  # BOS + "Once upon a time"
STORIES_GREEDY = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267,
                  337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432,
                  358, 394, 261, 370, 432, 352, 266, 268, 388, 426]
PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random HF Llama (GQA), sharpened so greedy argmaxes are not near-ties."""
  import torch
  d = tmp_path_factory.mktemp("tiny")
  hf = make_hf_llama(d, heads=4, kv_heads=2, seed=3)
  with torch.no_grad():
    hf.lm_head.weight.mul_(30.0)
    # Sharp attention, so that a wrong position or a leaked pad token changes the output.
    for layer in hf.model.layers:
      layer.self_attn.q_proj.weight.mul_(8.0)
      layer.self_attn.k_proj.weight.mul_(8.0)
  hf.save_pretrained(str(d), safe_serialization=True)
  return hf, medjax.load(str(d))


def test_bucket_length():
  assert [gen.bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]


def test_cached_decoding_matches_full_recompute(tiny):
  _, m = tiny
  rng = np.random.default_rng(0)
  steps = 5
  # Each row: prompt + `steps` more tokens fed one by one through the cache.
  seqs = [list(p) + rng.integers(3, 97, steps).tolist() for p in PROMPTS]
  length = gen.bucket_length(max(len(p) for p in PROMPTS))
  tokens, seg, pos, lengths = gen.left_pad(PROMPTS, length)
  cache = model.init_cache(m.cfg, len(PROMPTS), length + steps)
  fwd = jax.jit(model.forward, static_argnums=0)
  logits, cache = fwd(m.cfg, m.params, jnp.asarray(tokens), positions=pos,
                                segment_ids=seg, cache=cache)
  got = [[logits[i, -1]] for i in range(len(PROMPTS))]
  for s in range(steps):
    tok = np.array([[q[len(p) + s]] for p, q in zip(PROMPTS, seqs)], np.int32)
    logits, cache = fwd(m.cfg, m.params, jnp.asarray(tok),
                                  positions=(lengths + s)[:, None],
                                  segment_ids=np.ones((len(PROMPTS), 1), np.int32), cache=cache)
    for i in range(len(PROMPTS)):
      got[i].append(logits[i, 0])
  for i, (p, q) in enumerate(zip(PROMPTS, seqs)):
    full = np.asarray(m(np.array([q])))[0]  # no cache, no padding
    want = full[len(p) - 1: len(p) + steps]
    diff = np.abs(np.stack(got[i]) - want).max()
    assert diff <= 1e-5, (i, diff)


def test_scanned_layers_decode_the_same(tiny):
  # scan_layers keeps the cache stacked [L,...]; the unrolled model keeps one per layer.
  from medjax.model.params import to_layout
  _, m = tiny
  scfg = m.cfg.replace(scan_layers=True)
  want = gen.generate(m.cfg, m.params, PROMPTS, 6)
  assert gen.generate(scfg, to_layout(m.params, scfg), PROMPTS, 6) == want


def test_argmax_takes_the_first_of_ties():
  x = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, -0.5]])
  assert gen.argmax(x).tolist() == [1, 0, 3] == jnp.argmax(x, axis=-1).tolist()


def _hf_greedy(hf, prompt, n, eos):
  import torch
  out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                    max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_on_a_mixed_length_batch(tiny):
  hf, m = tiny
  no_stop = gen.generate(m.cfg, m.params, PROMPTS, 12)
  assert all(len(o) == 12 for o in no_stop)
  for p, o in zip(PROMPTS, no_stop):
    assert o == _hf_greedy(hf, p, 12, eos=None), p
  # Pick an EOS that row 0 emits mid-way: that row must stop there, the others go on.
  eos = no_stop[0][4]
  stopped = gen.generate(m.cfg, m.params, PROMPTS, 12, eos_id=eos)
  assert stopped[0] == no_stop[0][: no_stop[0].index(eos) + 1]
  for p, o in zip(PROMPTS, stopped):
    assert o == _hf_greedy(hf, p, 12, eos=eos), p
    assert eos not in o[:-1]


def test_prompts_in_one_bucket_share_a_compilation(tiny):
  _, m = tiny
  gen.generate(m.cfg, m.params, [[1, 2, 3], [1, 4]], 4)
  n = gen._generate_ids._cache_size()
  gen.generate(m.cfg, m.params, [[1, 2, 3, 4, 5, 6, 7], [1, 9, 9, 9, 9]], 4)  # same bucket
  assert gen._generate_ids._cache_size() == n
  gen.generate(m.cfg, m.params, [list(range(1, 20)), [1, 4]], 4)  # bucket 32
  assert gen._generate_ids._cache_size() == n + 1


def test_sampling_is_reproducible_and_seed_dependent(tiny):
  _, m = tiny
  kw = dict(max_new_tokens=16, temperature=5.0, top_p=0.95)
  a = gen.generate(m.cfg, m.params, PROMPTS, seed=1, **kw)
  assert a == gen.generate(m.cfg, m.params, PROMPTS, seed=1, **kw)
  assert a != gen.generate(m.cfg, m.params, PROMPTS, seed=2, **kw)
  # A tiny nucleus keeps only the top token: sampling then equals greedy decoding.
  greedy = gen.generate(m.cfg, m.params, PROMPTS, 16)
  assert gen.generate(m.cfg, m.params, PROMPTS, 16, temperature=1.0, top_p=1e-6,
                      seed=3) == greedy


def test_top_p_samples_only_from_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(gen._pick(logits, jax.random.PRNGKey(i), 1.0, 0.75, False)[0])
           for i in range(200)}
  # 0.5 + 0.3 >= 0.75: the nucleus is {0, 1}; both must appear in 200 draws.
  assert draws == {0, 1}


def test_generate_rejects_bad_input(tiny):
  _, m = tiny
  with pytest.raises(medjax.MedjaxError, match="empty"):
    gen.generate(m.cfg, m.params, [[1, 2], []], 4)
  with pytest.raises(medjax.MedjaxError, match="vocab"):
    gen.generate(m.cfg, m.params, [[1, 500]], 4)


def test_generate_under_transfer_guard(tiny):
  """The training loop disallows implicit host<->device copies; generate must still run."""
  _, m = tiny
  want = gen.generate(m.cfg, m.params, PROMPTS, 3)
  with jax.transfer_guard("disallow"):
    assert gen.generate(m.cfg, m.params, PROMPTS, 3) == want


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True, "attention": "dot_product"}])
def test_tinystories_reproduces_readme_greedy_reference(overrides):
  d = TINYSTORIES
  m = medjax.load(str(d), **overrides)
  assert gen.generate(m.cfg, m.params, [STORIES_PROMPT], 40, eos_id=2) == [STORIES_GREEDY]
  # Batched with a longer and a shorter prompt, the row must not change.
  out = gen.generate(m.cfg, m.params, [[1, 403], STORIES_PROMPT, STORIES_PROMPT + [432, 383]],
                     40, eos_id=2)
  assert out[1] == STORIES_GREEDY
  assert out[2] == STORIES_GREEDY[2:] + out[2][38:]

  from medjax.data.tokenizer import Tokenizer
  text = gen.generate_text(m, Tokenizer(d / "tokenizer.model"), ["Once upon a time"], 40)
  assert text == [", there was a little girl named Lily. She loved to play outside in the "
                  "park. One day, she saw a big, red ball."]
