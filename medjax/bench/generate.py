"""`bench generate`: greedy decoding, medjax (KV cache, compiled loop) vs `generate`."""

from __future__ import annotations

import time

from medjax.bench.common import median_of
from medjax.bench.models import hf_model


def bench_generate(s: dict, new_tokens: int, batch: int, prompt_len: int, reps: int,
                   compare_hf: bool) -> dict:
  import jax
  import numpy as np
  from medjax import generate as gen
  cfg = s["cfg"]
  rng = np.random.default_rng(1)
  prompts = [[cfg.bos_token_id] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist()
             for _ in range(batch)]
  if compare_hf:
    hf, params = hf_model(s)
    hf.eval()
  else:
    from medjax import model as model_lib
    params, hf = model_lib.init_params(cfg, jax.random.PRNGKey(0)), None
  params = jax.device_put(params)

  def mj():
    return gen.generate(cfg, params, prompts, new_tokens)

  r = {"mj_t": [], "hf_t": [], "tokens": batch * new_tokens}
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
  for i in range(reps):
    sides = [("mj", mj)] + ([("hf", hf_run)] if hf_run else [])
    for name, fn in (sides if i % 2 == 0 else sides[::-1]):
      t = time.perf_counter()
      fn()
      r[f"{name}_t"].append(time.perf_counter() - t)
  return r


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
  return lines
