"""`medjax bench`: medjax side by side with Hugging Face, in one process, alternately.

  medjax bench train --shape 50m --compare-hf --steps 16 --block 4   # tokens/s, MFU, ratio
  medjax bench train --shape demo --compare-hf --steps 200   # TinyStories-260K CPT, losses too
  medjax bench generate --shape 50m --compare-hf   # greedy decoding tokens/s, batch 8
  medjax bench data                                # packed CPT pipeline tokens/s
  medjax bench import                              # HF -> medjax of a ~1 GB model: time, RSS
  medjax bench fit                                 # `medjax fit` on the paper's TPU slices
  medjax bench scaling                             # tokens/s vs sequence length and width

The machine is shared by whatever else runs, so the two sides are timed in turn (single
steps, or blocks of steps with `--block`) and compared by ratio; the f32 matmul peaks of XLA
and PyTorch are measured the same way in the same run. Compilation and warm-up are timed separately, never in the rates. Each
run appends its figures, the device, date, commit and exact command to
`benchmarks/RESULTS.md` (`--no-record` to skip, `--results FILE` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"

# name -> model fields, train batch x seq, data ("random" tokens or the shipped "medical" text).
# 50m: 8 x (d512, f1408) layers + two 32000 x 512 tables = 58.6M params (50% embeddings).
SHAPES = {
    "tiny": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=172,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4),
                 batch=2, seq=64, data="random"),
    "demo": dict(hf_dir="asset:tinystories-260k", batch=16, seq=256, data="medical"),
    "50m": dict(model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
                batch=4, seq=512, data="random"),
}
# AdamW as the tiny CPT config trains (configs/tiny_cpt.py): warmup + cosine to 10%.
OPTIM = dict(lr=3e-3, warmup_frac=0.1, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, clip_norm=1.0)


# ------------------------------------------------------------------------------ common


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


class MatmulPeak:
  """f32 n x n matmul FLOP/s of XLA and PyTorch, sampled between benchmark steps.

  On a shared machine a single best-of figure catches a quiet moment the steps never saw;
  sampling alongside the steps and taking the median puts both under the same load.
  """

  def __init__(self, n: int = 1024, torch: bool = True):
    import jax
    import jax.numpy as jnp
    import numpy as np
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    self.flops, self.samples = 2 * n ** 3, {"xla": []}
    self.xa, f = jnp.asarray(a), jax.jit(lambda x: x @ x)
    f(self.xa).block_until_ready()
    self.fns = {"xla": lambda: f(self.xa).block_until_ready()}
    if torch:
      try:
        import torch as th
        ta = th.from_numpy(a)
        self.fns["torch"] = lambda: ta @ ta
        self.samples["torch"] = []
      except ImportError:
        pass

  def sample(self, reps: int = 1, keys=None) -> None:
    """One sample per library and rep: the median of 3 back-to-back calls (a single call
    right after a training step also times waking the thread pool)."""
    for _ in range(reps):
      for k, fn in self.fns.items():
        if keys is not None and k not in keys:
          continue
        calls = []
        for _ in range(3):
          t = time.perf_counter()
          fn()
          calls.append(time.perf_counter() - t)
        self.samples[k].append(self.flops / _median(calls))

  def median(self) -> dict:
    return {k: _median(v) for k, v in self.samples.items()}

  def best(self) -> dict:
    return {k: max(v) for k, v in self.samples.items()}

  def describe(self) -> str:
    med, best = self.median(), self.best()
    s = (f"matmul f32 1024^3 ({len(self.samples['xla'])} samples between blocks): XLA median "
         f"{_fmt_rate(med['xla'])} (best {_fmt_rate(best['xla'])})")
    if "torch" in med:
      s += (f", torch median {_fmt_rate(med['torch'])} (best {_fmt_rate(best['torch'])}); "
            f"XLA/torch {med['xla'] / med['torch']:.2f}")
    return s


def device_info() -> str:
  import jax
  d = jax.devices()[0]
  if d.platform != "cpu":
    return f"{jax.device_count()} x {d.device_kind}"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"CPU, {os.cpu_count()} cores ({model})"


def _commit() -> str:
  root = Path(__file__).resolve().parents[1]
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                         capture_output=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           text=True, capture_output=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (sha or "unknown") + (" (uncommitted changes)" if dirty else "")


def record(args, title: str, lines: list[str]) -> None:
  """Prints the figures and appends them to the results file (unless --no-record)."""
  print("\n".join(lines))
  if args.no_record:
    return
  path = Path(args.results or RESULTS)
  path.parent.mkdir(parents=True, exist_ok=True)
  cmd = shlex.join(["medjax", *sys.argv[1:]]) if Path(sys.argv[0]).name in (
      "medjax", "cli.py") else shlex.join(sys.argv)
  note = f" — {args.note}" if args.note else ""
  head = [f"## {title}", "",
          f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
          f"- device: {device_info()}{note}",
          f"- commit: {_commit()}", f"- command: `{cmd}`", "", "```"]
  new = not path.exists()
  with open(path, "a") as f:
    if new:
      f.write("# medjax benchmark results\n\nAppended by `medjax bench`; newest last.\n\n")
    f.write("\n".join(head + lines + ["```", "", ""]))
  print(f"(appended to {path})")


# ------------------------------------------------------------------------------ models


def _shape(name: str, args) -> dict:
  from medjax import config as config_lib, data as data_lib
  from medjax.errors import ConfigError
  if name not in SHAPES:
    raise ConfigError(f"--shape {name!r}: expected one of {', '.join(SHAPES)}")
  s = dict(SHAPES[name])
  if "hf_dir" in s:
    s["hf_dir"] = str(data_lib.asset_path(s["hf_dir"].split(":", 1)[1]))
    cfg = config_lib.load_hf_config(s["hf_dir"])
  else:
    cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **s["model"])
  over = {k: v for k, v in (("hidden_size", args.width), ("num_hidden_layers", args.layers))
          if v}
  if args.width:
    over["intermediate_size"] = 256 * -(-int(args.width * 8 / 3) // 256)
  if over and "hf_dir" in s:
    raise ConfigError("--width/--layers change random shapes only, not the shipped model")
  s["cfg"] = cfg.replace(attention=args.attention, **over) if args.attention else \
      cfg.replace(**over)
  s["batch"] = args.batch or s["batch"]
  s["seq"] = args.seq_len or s["seq"]
  return s


def hf_model(s: dict, seed: int = 0):
  """(torch LlamaForCausalLM in f32, medjax params with the same weights)."""
  import numpy as np
  import torch
  import transformers
  from medjax import config as config_lib, convert, modeldir
  cfg = s["cfg"]
  torch.manual_seed(seed)
  if "hf_dir" in s:
    m = transformers.LlamaForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32)
  else:
    hcfg = transformers.LlamaConfig(**{k: v for k, v in config_lib.to_hf_dict(cfg).items()
                                       if k not in ("architectures", "torch_dtype")})
    m = transformers.LlamaForCausalLM(hcfg)
  flat = {}
  for key, w in m.state_dict().items():
    hit = convert.lookup(key)
    if hit is not None and not (cfg.tie_word_embeddings and key == "lm_head.weight"):
      flat[hit[0]] = np.array(convert.to_medjax(cfg, hit[1], w.detach().float().numpy()))
  params = modeldir.to_layout(modeldir.unflatten(flat), cfg)
  return m, params


def train_batches(s: dict, n: int, seed: int = 0) -> list[dict]:
  """n batches of [B,T] numpy arrays. Both sides train on exactly these rows, attending over
  the whole row (transformers has no packed-segment mask), so segment ids are all 1."""
  import numpy as np
  b, t, cfg = s["batch"], s["seq"], s["cfg"]
  if s["data"] == "random":
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
      ids = rng.integers(3, cfg.vocab_size, (b, t + 1), dtype=np.int32)
      out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
  else:
    from medjax import corpus, data as data_lib
    from medjax.tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(s["hf_dir"], "tokenizer.model"))
    texts = corpus.read_texts([data_lib.asset_path("medical_text_sample.csv")])
    it = data_lib.make_cpt_iterator(texts, tok, t, b, seed=seed, num_threads=0)
    out = [{k: next_b[k] for k in ("inputs", "targets")} for next_b in
           (next(it) for _ in range(n))]
  for x in out:
    x["loss_mask"] = np.ones((b, t), np.float32)
    x["segment_ids"] = np.ones((b, t), np.int32)
    x["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return out


def _optim(total_steps: int):
  import ml_collections
  o = dict(OPTIM)
  o["warmup_steps"] = int(o.pop("warmup_frac") * total_steps)
  return ml_collections.ConfigDict(dict(o, total_steps=total_steps))


class MedjaxTrainer:
  """The `medjax train` step: sharded state on a 1-device mesh, jitted, state donated."""

  def __init__(self, cfg, params, steps: int):
    import jax
    from medjax import sharding, train_step as ts
    self.cfg = cfg
    pshape = jax.eval_shape(lambda: params)
    self.opt, self.sched = ts.make_optimizer(_optim(steps), cfg, pshape)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.state, shardings = sharding.shard_params_state(params, cfg, self.opt, mesh)
    self.step_fn = sharding.jit_train_step(cfg, self.opt, self.sched, mesh, shardings)
    self.bsh = sharding.batch_sharding(mesh)
    self.compile_s = None

  def compile(self, batch) -> float:
    import jax
    t = time.perf_counter()
    b = jax.device_put(batch, self.bsh)
    self.step_fn = self.step_fn.lower(self.state, b).compile()
    self.compile_s = time.perf_counter() - t
    return self.compile_s

  def step(self, batch) -> float:
    import jax
    self.state, m = self.step_fn(self.state, jax.device_put(batch, self.bsh))
    return float(m["loss"])  # waits for the step


class HFTrainer:
  """transformers' LlamaForCausalLM + torch.optim.AdamW, the same schedule and clipping."""

  def __init__(self, model, steps: int):
    import torch
    import optax
    from medjax import train_step as ts
    self.m = model.train()
    o = _optim(steps)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    sched = ts.learning_rate_schedule(o)
    # optax evaluates the schedule at the update count (0 first), as LambdaLR does.
    lrs = [float(sched(i)) / o.lr for i in range(steps + 2)]
    self.lr = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: lrs[min(i, len(lrs) - 1)])
    self.clip = o.clip_norm
    self.params = list(model.parameters())

  def step(self, batch) -> float:
    import torch
    import torch.nn.functional as F
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    mask = torch.from_numpy(batch["loss_mask"])
    self.opt.zero_grad(set_to_none=True)
    logits = self.m(input_ids=inputs).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.lr.step()
    return loss.item()


# ------------------------------------------------------------------------------ train


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
    hft = HFTrainer(hf, steps)
  else:
    import jax
    from medjax import model as model_lib
    params, hft = model_lib.init_params(cfg, jax.random.PRNGKey(0)), None
  mj = MedjaxTrainer(cfg, params, steps)
  del params
  r = {"compile_s": mj.compile(batches[0]), "tokens_per_step": tokens, "block": block,
       "flops_per_token": cfg.flops_per_token(s["seq"]), "mj_t": [], "hf_t": [],
       "mj_switch": [], "hf_switch": [], "mj_loss": [0.0] * steps,
       "hf_loss": [0.0] * steps if hft else [], "mj_warmup_s": 0.0, "hf_warmup_s": 0.0}
  peak = MatmulPeak(torch=compare_hf)
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
  return r


def _fmt_rate(x: float) -> str:
  return f"{x / 1e9:.2f} GFLOP/s"


def train_lines(s: dict, r: dict) -> list[str]:
  cfg = s["cfg"]
  peaks = r["peak"].median()
  lines = [f"shape {s['name']}: {cfg.num_params() / 1e6:.2f}M params (hidden "
           f"{cfg.hidden_size}, mlp {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
           f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}), batch {s['batch']} x "
           f"seq {s['seq']}, f32, {cfg.attention} attention",
           r["peak"].describe() + "; MFU below is against the medians"]
  out = {}
  for name, label, peak in (("mj", "medjax", peaks["xla"]),
                            ("hf", "transformers", peaks.get("torch", peaks["xla"]))):
    if not r[f"{name}_t"]:
      continue
    st = _median(r[f"{name}_t"])
    tps = r["tokens_per_step"] / st
    fl = tps * r["flops_per_token"]
    out[name] = tps
    extra = (f"compile {r['compile_s']:.1f} s + first step {r['mj_warmup_s']:.2f} s"
             if name == "mj" else f"first step {r['hf_warmup_s']:.2f} s")
    lines.append(f"{label:>12}: step {st * 1e3:8.1f} ms (median of {len(r[f'{name}_t'])}), "
                 f"{tps:9.0f} tokens/s, {_fmt_rate(fl)} = {fl / peaks['xla']:.1%} of XLA peak"
                 + (f", {fl / peak:.1%} of torch peak" if name == "hf" else "")
                 + f"; warm-up excluded: {extra}")
  if r.get("mj_switch"):
    lines.append(f"first step of each block of {r['block']} (the other library ran just "
                 f"before; not in the medians): medjax {_median(r['mj_switch']) * 1e3:.1f} ms"
                 + (f", transformers {_median(r['hf_switch']) * 1e3:.1f} ms"
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


# ------------------------------------------------------------------------------ generate


def bench_generate(s: dict, new_tokens: int, batch: int, prompt_len: int, reps: int,
                   compare_hf: bool) -> dict:
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
    import jax
    from medjax import model as model_lib
    params, hf = model_lib.init_params(cfg, jax.random.PRNGKey(0)), None
  import jax
  params = jax.device_put(params)
  mj = lambda: gen.generate(cfg, params, prompts, new_tokens)
  r = {"mj_t": [], "hf_t": [], "tokens": batch * new_tokens}
  t = time.perf_counter()
  mj_out = mj()  # compiles
  r["compile_s"] = time.perf_counter() - t
  hf_run = None
  if hf is not None:
    import torch
    ids = torch.tensor(prompts)
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
  lines = [f"shape {s['name']}: {cfg.num_params() / 1e6:.2f}M params, f32, batch {batch}, "
           f"prompt {prompt_len} tokens, {new_tokens} new tokens, greedy"]
  tps = {}
  for name, label in (("mj", "medjax"), ("hf", "transformers")):
    if r[f"{name}_t"]:
      t = _median(r[f"{name}_t"])
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


# ------------------------------------------------------------------------------ import


IMPORT_SHAPES = {
    # 16 x (d1024, f2816) layers + 2 x 32000 x 1024 tables = 267M params = 1.07 GB in f32.
    "1gb": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4),
}


def write_synthetic_hf(cfg, out_dir: str, shard_bytes: int) -> list[str]:
  """A random HF Llama dir (config.json + f32 safetensors shards), one tensor in memory."""
  import json
  import jax
  import numpy as np
  from medjax import config as config_lib, convert, model as model_lib, modeldir
  shapes = modeldir.flatten(jax.eval_shape(
      lambda: model_lib.init_params(cfg.replace(scan_layers=False), jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)

  def get(path):
    if path.endswith("scale"):
      return np.ones(shapes[path].shape, np.float32)
    return rng.standard_normal(shapes[path].shape, dtype=np.float32) * np.float32(0.02)

  os.makedirs(out_dir, exist_ok=True)
  names = convert.write_hf_weights(cfg, out_dir, get, np.float32, shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_lib.to_hf_dict(cfg), f)
  return [os.path.join(out_dir, n) for n in names]


def _child_rss(cmd: list[str]) -> tuple[float, int, str]:
  """(wall s, peak RSS bytes, output) of one child process (wait4: this child's own RSS)."""
  t = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out = p.stdout.read()
  _, status, ru = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-2000:]}")
  return wall, ru.ru_maxrss * 1024, out  # Linux reports KiB


def bench_import(shape: str, shard_mb: float, workdir: str | None = None) -> dict:
  from medjax import config as config_lib
  cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **IMPORT_SHAPES[shape])
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "medjax")
    t = time.perf_counter()
    shards = write_synthetic_hf(cfg, hf_dir, int(shard_mb * (1 << 20)))
    write_s = time.perf_counter() - t
    sizes = [os.path.getsize(p) for p in shards]
    base_s, base_rss, _ = _child_rss([sys.executable, "-c",
                                      "import medjax.cli, medjax.convert_cli, medjax.hf"])
    wall, rss, out = _child_rss([sys.executable, "-m", "medjax.cli", "import-hf", hf_dir,
                                 out_dir])
    ckpt = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
  return {"params": cfg.num_params(), "shards": sizes, "write_s": write_s, "wall_s": wall,
          "peak_rss": rss, "baseline_rss": base_rss, "baseline_s": base_s,
          "ckpt_bytes": ckpt, "log": out.strip().splitlines()[-1:]}


def import_lines(shape: str, r: dict) -> list[str]:
  mb = lambda b: f"{b / (1 << 20):.0f} MiB" if b >= 10 << 20 else f"{b / (1 << 20):.2f} MiB"
  big = max(r["shards"])
  return [
      f"synthetic HF Llama '{shape}': {r['params'] / 1e6:.1f}M params, f32, "
      f"{len(r['shards'])} shards ({', '.join(mb(s) for s in r['shards'])}), "
      f"written in {r['write_s']:.1f} s",
      f"import-hf (subprocess, scan layout): {r['wall_s']:.1f} s wall, peak RSS "
      f"{mb(r['peak_rss'])} = {r['peak_rss'] / big:.2f}x the largest shard ({mb(big)})",
      f"  of which python + jax + orbax at rest: {mb(r['baseline_rss'])} "
      f"(import alone {r['baseline_s']:.1f} s); above it: "
      f"{(r['peak_rss'] - r['baseline_rss']) / big:.2f}x the largest shard",
      f"  checkpoint written: {mb(r['ckpt_bytes'])}",
  ]


# ------------------------------------------------------------------------------ fit


def bench_fit(quick: bool) -> list[dict]:
  """The fit table's rows (`medjax.fit.bench_cases`)."""
  from medjax import fit
  return fit.bench_cases(quick)


def fit_lines(rows: list[dict]) -> list[str]:
  """A markdown table with the columns of benchmarks/FIT.md."""
  def gib(x):
    return "–" if x != x else f"{x:.2f} GiB"
  lines = ["| model | slice | rows/chip | remat | args + temps | XLA peak | MaxText | fits "
           "| compile wall / CPU |", "|---|---|---:|---|---:|---:|---:|---|---:|"]
  for r in rows:
    peak = gib(r["peak_gib"]) + (f" + {r['host_gib']:.1f} GiB host" if r["host_gib"] else "")
    maxtext = r["maxtext"] if isinstance(r["maxtext"], str) else gib(r["maxtext"] or math.nan)
    lines.append(f"| {r['model']} | {r['topology']} | {r['batch_per_device']} | {r['remat']} "
                 f"| {gib(r['per_device_gib'])} | {peak} | {maxtext} "
                 f"| {'yes' if r['fits'] else 'no'} "
                 f"| {r['compile_s']:.0f} s / {r['compile_cpu_s']:.0f} s |")
  lines += [f"NOTE: {n}" for n in dict.fromkeys(r["note"] for r in rows if r.get("note"))]
  lines += [f"{r['topology']} x{r['batch_per_device']}: {r['error']}" for r in rows
            if r.get("error")]
  return lines


# ------------------------------------------------------------------------------ scaling


def bench_scaling(args, seqs, widths, tokens_per_step: int, steps: int, log=print) -> list:
  """medjax tokens/s vs sequence length and vs width (at the shape's sequence length), with
  the same tokens per step everywhere."""
  rows = []
  base_seq = SHAPES[args.shape]["seq"]
  points = [("seq", t, None) for t in seqs] + [("width", base_seq, w) for w in widths]
  for kind, seq, width in points:
    a = argparse.Namespace(**{**vars(args), "seq_len": seq, "width": width,
                              "batch": max(tokens_per_step // seq, 1)})
    s = dict(_shape(args.shape, a), name=args.shape)
    r = bench_train(s, steps, compare_hf=False, warmup=args.warmup, log=lambda *x: None)
    st = _median(r["mj_t"])
    tps = r["tokens_per_step"] / st
    rows.append({"kind": kind, "seq": seq, "width": s["cfg"].hidden_size,
                 "params": s["cfg"].num_params(), "batch": s["batch"], "tokens_per_s": tps,
                 "flops": tps * r["flops_per_token"], "peak": r["peak"].median()["xla"],
                 "attn_share": _attn_share(s["cfg"], seq), "compile_s": r["compile_s"]})
    log("measured " + _scaling_row(rows[-1]), flush=True)
  return rows


def _attn_share(cfg, seq: int) -> float:
  attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.hd * seq / 2
  return attn / cfg.flops_per_token(seq)


def _scaling_row(r: dict) -> str:
  return (f"| {r['seq']:>5} | {r['width']:>5} | {r['params'] / 1e6:6.1f}M | {r['batch']:>3} | "
          f"{r['tokens_per_s']:8.0f} | {r['flops'] / 1e9:6.1f} | {r['flops'] / r['peak']:5.1%} | "
          f"{r['attn_share']:5.1%} |")


def scaling_lines(rows) -> list[str]:
  head = ["| seq | width | params | batch | tokens/s | GFLOP/s | of XLA peak | attn FLOPs |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  return head + [_scaling_row(r) for r in rows]


# ------------------------------------------------------------------------------ CLI


def add_args(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

  def common(p, shape="50m"):
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--results", help=f"results file (default {RESULTS})")
    p.add_argument("--note", default="", help="a note for the device line, e.g. 'shared'")
    if shape:
      p.add_argument("--shape", default=shape, choices=list(SHAPES))
      p.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
      p.add_argument("--seq-len", type=int, help="tokens per row (default: the shape's)")
      p.add_argument("--width", type=int, help="hidden size (random shapes; mlp = 8/3 width)")
      p.add_argument("--layers", type=int, help="number of layers (random shapes)")
      p.add_argument("--attention", choices=["einsum", "dot_product"], default=None)

  t = sub.add_parser("train", help="train steps: medjax vs transformers + torch AdamW")
  common(t)
  t.add_argument("--steps", type=int, default=6, help="steps per side, warm-up included")
  t.add_argument("--warmup", type=int, default=1, help="untimed first steps")
  t.add_argument("--block", type=int, default=None,
                 help="steps per side before switching (default 5 from 20 steps, else 1)")
  t.add_argument("--compare-hf", action="store_true")

  g = sub.add_parser("generate", help="greedy decoding: medjax vs transformers' generate")
  common(g)
  g.add_argument("--new-tokens", type=int, default=64)
  g.add_argument("--prompt-len", type=int, default=16)
  g.add_argument("--reps", type=int, default=3)
  g.add_argument("--compare-hf", action="store_true")

  d = sub.add_parser("data", help="packed CPT pipeline tokens/s per process")
  common(d, shape=None)
  d.add_argument("--seq-len", type=int, default=2048)
  d.add_argument("--batch-size", type=int, default=8)
  d.add_argument("--batches", type=int, default=200)

  i = sub.add_parser("import", help="HF -> medjax import of a synthetic model: time, RSS")
  common(i, shape=None)
  i.add_argument("--size", choices=list(IMPORT_SHAPES), default="1gb")
  i.add_argument("--shard-mb", type=float, default=768,
                 help="HF shard size (default: as Llama-2-7b-hf, largest shard ~3/4 model)")
  i.add_argument("--tmp", help="where to write the synthetic checkpoint (default $TMPDIR)")

  f = sub.add_parser("fit", help="`medjax fit` on the paper's TPU slices")
  common(f, shape=None)
  f.add_argument("--quick", action="store_true", help="one tiny case (for tests)")

  c = sub.add_parser("scaling", help="medjax tokens/s vs sequence length and width")
  common(c)
  c.add_argument("--seqs", default="512,1024,2048,4096")
  c.add_argument("--widths", default="256,512,768,1024")
  c.add_argument("--tokens-per-step", type=int, default=4096)
  c.add_argument("--steps", type=int, default=3)
  c.add_argument("--warmup", type=int, default=1)


def run(args: argparse.Namespace) -> int:
  cmd = args.bench_command
  if cmd == "fit" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU stand-in devices for the slice when libtpu is absent; before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=32").strip()
  if cmd in ("train", "generate", "scaling"):
    s = dict(_shape(args.shape, args), name=args.shape)
  if cmd == "train":
    r = bench_train(s, args.steps, args.compare_hf, args.warmup, block=args.block)
    record(args, f"train --shape {args.shape}", train_lines(s, r))
  elif cmd == "generate":
    b = args.batch or 8
    r = bench_generate(s, args.new_tokens, b, args.prompt_len, args.reps, args.compare_hf)
    record(args, f"generate --shape {args.shape}",
           generate_lines(s, r, args.new_tokens, b, args.prompt_len))
  elif cmd == "data":
    from medjax import corpus, data as data_lib
    from medjax.tokenizer import Tokenizer
    tok = Tokenizer(data_lib.asset_path("tinystories-260k/tokenizer.model"))
    texts = corpus.read_texts([data_lib.asset_path("medical_text_sample.csv")])
    r = data_lib.bench_data(texts, tok, args.seq_len, args.batch_size, args.batches)
    record(args, "data", [
        f"packed CPT pipeline (shipped medical sample, TinyStories tokenizer), batch "
        f"{r['batch_size']} x seq {r['seq_len']}, {r['num_batches']} batches, one process:",
        f"  tokenize {r['tokenize_tokens_per_s']:,} tokens/s ({r['num_tokens']:,} tokens, "
        f"{r['num_docs']} docs); pipeline {r['pipeline_tokens_per_s']:,} tokens/s; "
        f"end to end {r['end_to_end_tokens_per_s']:,} tokens/s"])
  elif cmd == "import":
    r = bench_import(args.size, args.shard_mb, args.tmp)
    record(args, f"import --size {args.size}", import_lines(args.size, r))
  elif cmd == "fit":
    record(args, "fit", fit_lines(bench_fit(args.quick)))
  elif cmd == "scaling":
    seqs = [int(x) for x in args.seqs.split(",") if x]
    widths = [int(x) for x in args.widths.split(",") if x]
    rows = bench_scaling(args, seqs, widths, args.tokens_per_step, args.steps)
    record(args, f"scaling --shape {args.shape}", [
        f"medjax training, {args.tokens_per_step} tokens per step, f32 "
        f"(rows 1-{len(seqs)}: seq varies at width {s['cfg'].hidden_size}; then width "
        f"varies at seq {SHAPES[args.shape]['seq']}; mlp = 8/3 width)", *scaling_lines(rows)])
  return 0
