"""`bench train`: medjax and transformers train the same steps, alternating in blocks."""

from __future__ import annotations

import sys
import time

from medjax.bench.common import MatmulPeak, fmt_rate, median_of
from medjax.bench.models import HFTrainer, MedjaxTrainer, hf_model, train_batches


def bench_train(s: dict, steps: int, compare_hf: bool, warmup: int = 1, log=print,
                block: int | None = None) -> dict:
  """Trains `steps` steps with medjax (and HF) on the same batches, alternating in blocks.

  Each side runs `block` steps, then the other side runs the same steps; who goes first
  alternates. With blocks > 1 the first step of a block is timed apart ("switch" steps):
  the other library's thread pool may still be spinning then (PyTorch's OpenMP workers cost
  XLA's matmul ~30% right after a torch call, measured), and neither side should pay for
  the other. Each library's matmul peak is sampled right after its own block.
  The first `warmup` steps of each side are trained but not timed. Returns timings (median
  step), losses per step, compile time, peaks.
  """
  cfg = s["cfg"]
  tokens = s["batch"] * s["seq"]
  block = block or (5 if steps >= 20 else 1)
  if block < 1:
    from medjax.errors import ConfigError
    raise ConfigError(f"--block {block}: expected a positive number of steps")
  batches = train_batches(s, steps)
  log(f"shape: {cfg.num_params() / 1e6:.2f}M params (d{cfg.hidden_size} f"
      f"{cfg.intermediate_size} L{cfg.num_hidden_layers} h{cfg.num_attention_heads} "
      f"v{cfg.vocab_size}), batch {s['batch']} x seq {s['seq']}, {steps} steps "
      f"({warmup} warm-up), blocks of {block}")
  if compare_hf:
    hf, params = hf_model(s)
    hft = HFTrainer(hf, steps, cfg.dtype, s.get("lr"))
  else:
    import jax
    from medjax.model import llama as model_lib
    params, hft = model_lib.init_params(cfg, jax.random.PRNGKey(0)), None
  mj = MedjaxTrainer(cfg, params, steps, s.get("lr"))
  del params
  r = {"compile_s": mj.compile(batches[0]), "tokens_per_step": tokens, "block": block,
       "flops_per_token": cfg.flops_per_token(s["seq"]), "mj_t": [], "hf_t": [],
       "mj_switch": [], "hf_switch": [], "mj_loss": [0.0] * steps,
       "hf_loss": [0.0] * steps if hft else [], "mj_warmup_s": 0.0, "hf_warmup_s": 0.0}
  peak = MatmulPeak.for_backend(torch=compare_hf)
  lib = {"mj": "xla", "hf": "torch"}
  every = max(steps // 10, 1)
  for n, start in enumerate(range(0, steps, block)):
    stop = min(start + block, steps)
    sides = [("mj", mj.step)] + ([("hf", hft.step)] if hft else [])
    if n % 2:  # alternate who goes first
      sides.reverse()
    for name, fn in sides:
      for i in range(start, stop):
        t = time.perf_counter()
        r[f"{name}_loss"][i] = fn(batches[i])
        dt = time.perf_counter() - t
        if i < warmup:
          r[f"{name}_warmup_s"] += dt
        else:
          r[f"{name}_switch" if i == start and block > 1 else f"{name}_t"].append(dt)
      peak.sample(keys=[lib[name]])
    if steps >= 20 and stop // every != start // every:
      print(f"  step {stop}/{steps}", file=sys.stderr, flush=True)
  peak.sample(3)
  r["peak"] = peak
  r["params"], r["batch"] = mj.state["params"], batches[-1]  # for `bench_breakdown`
  return r


def bench_breakdown(cfg, params, batch: dict, reps: int = 5) -> dict:
  """Where medjax's step goes. Each part is jitted alone and the parts are timed in turn
  (median of `reps`): the loss and gradient of the whole model; of the model without its
  layers (embedding, final norm, head and loss); and the attention alone (`model.attend`,
  fwd+bwd, at the step's shape and segment ids, once per layer). The layers' other work
  (projections, MLP, norms, RoPE) is what is left. Returns seconds per part."""
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from medjax.model import llama as model
  from medjax.training import step as ts
  b = jax.device_put(batch)
  grad = lambda c: jax.jit(jax.value_and_grad(functools.partial(ts.loss_sums, cfg=c),
                                              has_aux=True))
  rows, t = batch["inputs"].shape
  n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.standard_normal((rows, t, m, h)), cfg.dtype) for m in (n, k, k))
  seg = b["segment_ids"]
  attn = jax.jit(jax.grad(lambda q, kk, v: jnp.sum(
      model.attend(cfg, q, kk, v, seg, h ** -0.5).astype(jnp.float32)), (0, 1, 2)))
  head_only = {name: p for name, p in params.items() if not name.startswith("layers")}
  parts = {"model": (grad(cfg), (params, b)),
           "head": (grad(cfg.replace(num_hidden_layers=0)), (head_only, b)),
           "attention": (attn, (q, kk, v))}
  times = {name: [] for name in parts}
  for fn, args in parts.values():
    jax.block_until_ready(fn(*args))  # compile
  for _ in range(reps):
    for name, (fn, args) in parts.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  out = {name: median_of(ts_) for name, ts_ in times.items()}
  out["attention"] *= cfg.num_hidden_layers
  out["reps"] = reps
  return out


def breakdown_lines(cfg, r: dict, bd: dict) -> list[str]:
  """The parts in ms and shares of the gradient, and what each would leave of the step."""
  step = median_of(r["mj_t"])
  hf = median_of(r["hf_t"]) if r["hf_t"] else None
  whole = bd["model"]
  parts = [("embedding, final norm, head and loss", bd["head"]),
           (f"attention, fwd+bwd x {cfg.num_hidden_layers} layers", bd["attention"]),
           ("the layers' other work (projections, MLP, norms, RoPE; the rest)",
            whole - bd["head"] - bd["attention"]),
           ("optimizer update and the rest of the step (the step less the gradient)",
            step - whole)]
  lines = [f"where medjax's step goes (each part jitted alone, timed in turn, median of "
           f"{bd['reps']}): loss + gradient {whole * 1e3:.1f} ms of the {step * 1e3:.1f} ms step"]
  for label, sec in parts:
    bound = (f"; the step without it would be {hf / max(step - sec, 1e-9):.2f}x transformers"
             if hf else "")
    lines.append(f"  {label}: {sec * 1e3:.1f} ms ({sec / step:.0%} of the step){bound}")
  return lines


def train_lines(s: dict, r: dict) -> list[str]:
  cfg = s["cfg"]
  peaks = r["peak"].median()
  lines = [f"shape {s['name']}: {cfg.num_params() / 1e6:.2f}M params (hidden "
           f"{cfg.hidden_size}, mlp {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
           f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}), batch {s['batch']} x "
           f"seq {s['seq']}, {cfg.dtype} activations (f32 weights and AdamW), "
           f"{cfg.attention} attention", r["peak"].describe() + "; MFU below is against the medians"]
  out = {}
  for name, label, peak in (("mj", "medjax", peaks["xla"]),
                            ("hf", "transformers", peaks.get("torch", peaks["xla"]))):
    if not r[f"{name}_t"]:
      continue
    st = median_of(r[f"{name}_t"])
    tps = r["tokens_per_step"] / st
    fl = tps * r["flops_per_token"]
    out[name] = tps
    extra = (f"compile {r['compile_s']:.1f} s + first step {r['mj_warmup_s']:.2f} s"
             if name == "mj" else f"first step {r['hf_warmup_s']:.2f} s")
    lines.append(f"{label:>12}: step {st * 1e3:8.1f} ms (median of {len(r[f'{name}_t'])}), "
                 f"{tps:9.0f} tokens/s, {fmt_rate(fl)} = {fl / peaks['xla']:.1%} of XLA peak"
                 + (f", {fl / peak:.1%} of torch peak" if name == "hf" else "")
                 + (f", {fl / r['peak'].datasheet:.1%} of the datasheet's "
                    f"{fmt_rate(r['peak'].datasheet)}" if r["peak"].datasheet else "")
                 + f"; warm-up excluded: {extra}")
  if r.get("mj_switch"):
    lines.append(f"first step of each block of {r['block']} (the other library ran just "
                 f"before; not in the medians): medjax {median_of(r['mj_switch']) * 1e3:.1f} ms"
                 + (f", transformers {median_of(r['hf_switch']) * 1e3:.1f} ms"
                    if r.get("hf_switch") else ""))
  if "hf" in out:
    lines.append(f"ratio medjax / transformers tokens/s: {out['mj'] / out['hf']:.2f}x")
    n = len(r["mj_loss"])
    marks = sorted({0, n // 4, n // 2, n - 1} if n > 4 else set(range(n)))
    lines.append("loss (step: medjax / transformers): " + ", ".join(
        f"{i + 1}: {r['mj_loss'][i]:.4f} / {r['hf_loss'][i]:.4f}" for i in marks))
    last = min(10, n)
    a, b = (sum(r[k][-last:]) / last for k in ("mj_loss", "hf_loss"))
    lines.append(f"mean loss of the last {last} steps: medjax {a:.4f}, transformers {b:.4f} "
                 f"(rel. diff {abs(a - b) / b:.2%})")
  return lines
