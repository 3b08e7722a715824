"""`bench generate`: greedy decoding, medjax (KV cache, compiled loop) vs `generate`."""

from __future__ import annotations

import time

from medjax.bench.common import median_of
from medjax.bench.models import hf_model


def bench_generate(s: dict, new_tokens: int, batch: int, prompt_len: int, reps: int,
                   compare_hf: bool) -> dict:
  import jax
  import numpy as np
  from medjax.evaluation import generate as gen
  cfg = s["cfg"]
  rng = np.random.default_rng(1)
  prompts = [[cfg.bos_token_id] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist()
             for _ in range(batch)]
  if compare_hf:
    hf, params = hf_model(s)
    hf.eval()
  else:
    from medjax.model import llama as model_lib
    params, hf = model_lib.init_params(cfg, jax.random.PRNGKey(0)), None
  params = jax.device_put(params)

  def mj():
    return gen.generate(cfg, params, prompts, new_tokens)

  r = {"mj_t": [], "hf_t": [], "floor_t": [], "read_t": [], "tokens": batch * new_tokens}
  t = time.perf_counter()
  mj_out = mj()  # compiles
  r["compile_s"] = time.perf_counter() - t
  hf_run = None
  if hf is not None:
    import torch
    ids = torch.tensor(prompts).to(hf.device)
    hf.generation_config.eos_token_id = None  # always N tokens, like medjax with eos_id=None
    hf.generation_config.pad_token_id = 0

    def hf_run():
      with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens)
      return out[:, prompt_len:].tolist()

    t = time.perf_counter()
    hf_out = hf_run()
    r["hf_warmup_s"] = time.perf_counter() - t
    r["agree"] = float(np.mean([a == b for a, b in zip(mj_out, hf_out)]))
    r["token_agree"] = float(np.mean(np.array(mj_out) == np.array(hf_out)))
  floor = WeightFloor(cfg, params, batch, new_tokens)
  for i in range(reps):
    sides = [("mj", mj)] + ([("hf", hf_run)] if hf_run else []) + [("floor", floor.run)]
    for name, fn in (sides if i % 2 == 0 else sides[::-1]):
      t = time.perf_counter()
      fn()
      r[f"{name}_t"].append(time.perf_counter() - t)
    r["read_t"].append(floor.read())
  r["floor_mb"] = floor.bytes / 2 ** 20
  return r


def _layer_weights(cfg, params) -> list[dict]:
  """Each layer's projections as 2-D [in, out] arrays (scanned stacks sliced per layer)."""
  import jax
  d = cfg.hidden_size
  as_2d = lambda name, w: w.reshape(-1, d) if name in ("o", "down") else w.reshape(d, -1)
  layers = []
  for i in range(cfg.num_hidden_layers):
    lp = (jax.tree.map(lambda x, i=i: x[i], params["layers"]) if cfg.scan_layers
          else params[f"layers_{i}"])
    layers.append({n: as_2d(n, lp[blk][n]["w"]) for blk, names in
                   (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for n in names})
  return layers


class WeightFloor:
  """A decode step reduced to its weight matmuls: the same weights and batch, chained
  through every layer's projections and the head, then the greedy argmax and the next
  token's embedding, as `medjax.evaluation.generate` does, in one jitted loop of `steps` steps; no
  attention, norms, RoPE or KV cache. Reading the weights is what a decode step at a small
  batch cannot avoid; this is how fast XLA's matmuls do it here. `read()` times a plain XLA
  sum over the same bytes (the machine's read bandwidth).

  The argmax matters: XLA:CPU fuses a max-reduce into the head's matmul (YNNPACK) and then
  runs that matmul ~1.7x faster (2.0 vs 3.7 ms per step at 50m, measured), a path the
  decode cannot take, as it needs every logit for the index.
  """

  def __init__(self, cfg, params, batch: int, steps: int):
    import jax
    import jax.numpy as jnp
    dt = jnp.dtype(cfg.dtype)
    from medjax.evaluation import generate as gen
    layers = _layer_weights(cfg, params)
    emb = params["embedding"]
    head = emb if cfg.tie_word_embeddings else params["lm_head"]
    self.weights = (layers, head)
    self.bytes = sum(w.nbytes for w in jax.tree.leaves(self.weights))
    tied = cfg.tie_word_embeddings

    def loop(weights, emb, x):  # weights are arguments, as the decode's params are
      layers, head = weights

      def step(_, x):
        for w in layers:
          w = {n: a.astype(dt) for n, a in w.items()}
          kv = (x @ w["k"])[:, :1] + (x @ w["v"])[:, :1]  # materialized, as the cache write
          x = x + 1e-3 * ((x @ w["q"]) @ w["o"]) + 1e-9 * kv
          x = x + 1e-3 * (((x @ w["gate"]) * (x @ w["up"])) @ w["down"])
        logits = x @ (head.astype(dt).T if tied else head.astype(dt))
        return jnp.take(emb, gen.argmax(logits), axis=0).astype(dt)

      return jax.lax.fori_loop(0, steps, step, x)

    x0 = jnp.ones((batch, cfg.hidden_size), dt)
    self._loop = jax.jit(loop)
    self._sum = jax.jit(lambda ws: sum(jnp.sum(w) for w in jax.tree.leaves(ws)))
    self.run = lambda: self._loop(self.weights, emb, x0).block_until_ready()
    self.run()
    self.read()

  def read(self) -> float:
    t = time.perf_counter()
    self._sum(self.weights).block_until_ready()
    return time.perf_counter() - t


def generate_lines(s: dict, r: dict, new_tokens: int, batch: int, prompt_len: int) -> list[str]:
  cfg = s["cfg"]
  lines = [f"shape {s['name']}: {cfg.num_params() / 1e6:.2f}M params, {cfg.dtype}, batch {batch}, "
           f"prompt {prompt_len} tokens, {new_tokens} new tokens, greedy"]
  tps = {}
  for name, label in (("mj", "medjax"), ("hf", "transformers")):
    if r[f"{name}_t"]:
      t = median_of(r[f"{name}_t"])
      tps[name] = r["tokens"] / t
      warm = (f"compile + first call {r['compile_s']:.1f} s" if name == "mj" else
              f"first call {r['hf_warmup_s']:.2f} s")
      lines.append(f"{label:>12}: {t * 1e3:8.1f} ms per call (median of {len(r[name + '_t'])}),"
                   f" {tps[name]:8.0f} new tokens/s; warm-up excluded: {warm}")
  if "hf" in tps:
    lines.append(f"ratio medjax / transformers tokens/s: {tps['mj'] / tps['hf']:.2f}x")
    lines.append(f"same greedy ids as transformers: {r['agree']:.0%} of rows, "
                 f"{r['token_agree']:.1%} of tokens")
  floor = median_of(r["floor_t"]) / new_tokens
  per = {k: batch / v for k, v in tps.items()}  # seconds per decode step
  gbs = lambda t: r["floor_mb"] * 2 ** 20 / t / 1e9
  lines.append(
      f"weight floor: a decode step reduced to its weight matmuls ({r['floor_mb']:.1f} MiB), "
      f"argmax and next embedding (batch {batch}, jitted loop; no attention, norms, RoPE or "
      f"cache) takes {floor * 1e3:.2f} ms = {gbs(floor):.1f} GB/s of weights; an XLA sum over "
      f"the same bytes reads {gbs(median_of(r['read_t'])):.1f} GB/s")
  lines.append(f"per step: medjax {per['mj'] * 1e3:.2f} ms (prefill included)"
               + (f", transformers {per['hf'] * 1e3:.2f} ms; a decode step at the floor "
                  f"would be {per['hf'] / floor:.2f}x transformers" if "hf" in per else ""))
  return lines
