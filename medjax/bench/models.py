"""Benchmark shapes, the same weights and batches for both sides, and the two trainers."""

from __future__ import annotations

import os
import time

from medjax.assets import asset_path

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
    # Llama-2-7B width for GPUs; pass --layers to fit both sides in one device's memory.
    # lr 3e-4: at the small shapes' 3e-3 both libraries' losses blew up (11 -> 14-17) in the
    # first steps, which made the loss check meaningless (measured on an H200).
    "7b": dict(model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
               batch=1, seq=4096, data="random", lr=3e-4),
}
# AdamW as the tiny CPT config trains (configs/tiny_cpt.py): warmup + cosine to 10%.
OPTIM = dict(lr=3e-3, warmup_frac=0.1, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, clip_norm=1.0)


def on_accelerator() -> bool:
  import jax
  return jax.default_backend() != "cpu"


def make_shape(name: str, args) -> dict:
  """The shape's config with the command line's overrides. Off CPU the defaults are bf16
  activations (f32 weights and optimizer) and attention 'auto' (cuDNN on GPU)."""
  from medjax.checkpoints import hf_config
  from medjax.errors import ConfigError
  from medjax.model import config as config_lib
  if name not in SHAPES:
    raise ConfigError(f"--shape {name!r}: expected one of {', '.join(SHAPES)}")
  s = dict(SHAPES[name])
  if "hf_dir" in s:
    s["hf_dir"] = str(asset_path(s["hf_dir"].split(":", 1)[1]))
    cfg = hf_config.load_hf_config(s["hf_dir"])
  else:
    cfg = config_lib.LlamaConfig(max_position_embeddings=4096, **s["model"])
  over = {k: v for k, v in (("hidden_size", args.width), ("num_hidden_layers", args.layers))
          if v}
  if args.width:
    over["intermediate_size"] = 256 * -(-int(args.width * 8 / 3) // 256)
  if over and "hf_dir" in s:
    raise ConfigError("--width/--layers change random shapes only, not the shipped model")
  accel = on_accelerator()
  over["dtype"] = getattr(args, "dtype", None) or ("bfloat16" if accel else "float32")
  attention = args.attention or ("auto" if accel else None)
  s["cfg"] = cfg.replace(attention=attention, **over) if attention else cfg.replace(**over)
  s["batch"] = args.batch or s["batch"]
  s["seq"] = args.seq_len or s["seq"]
  return s


def torch_device():
  """CUDA when jax runs on a GPU too (the two sides share the device), else CPU."""
  import torch
  return torch.device("cuda" if on_accelerator() and torch.cuda.is_available() else "cpu")


def hf_model(s: dict, seed: int = 0):
  """(torch LlamaForCausalLM with f32 weights and sdpa attention on `torch_device()`,
  medjax params (numpy) with the same weights)."""
  import numpy as np
  import torch
  import transformers
  from medjax.checkpoints import convert, hf_config
  from medjax.model import params as params_lib
  cfg = s["cfg"]
  torch.manual_seed(seed)
  if "hf_dir" in s:
    m = transformers.LlamaForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32,
                                                      attn_implementation="sdpa")
  else:
    hcfg = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf_dict(cfg).items()
                                       if k not in ("architectures", "torch_dtype")},
                                    attn_implementation="sdpa")
    m = transformers.LlamaForCausalLM(hcfg)
  flat = {}
  for key, w in m.state_dict().items():
    hit = convert.lookup(key)
    if hit is not None and not (cfg.tie_word_embeddings and key == "lm_head.weight"):
      flat[hit[0]] = np.array(convert.to_medjax(cfg, hit[1], w.detach().float().numpy()))
  params = params_lib.to_layout(params_lib.unflatten(flat), cfg)
  return m.to(torch_device()), params


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
    from medjax.data import corpus, pipeline  # grain: only the shipped-model shapes need it
    from medjax.data.tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(s["hf_dir"], "tokenizer.model"))
    texts = corpus.read_texts([asset_path("medical_text_sample.csv")])
    it = pipeline.make_cpt_iterator(texts, tok, t, b, seed=seed, num_threads=0)
    out = [{k: next_b[k] for k in ("inputs", "targets")} for next_b in
           (next(it) for _ in range(n))]
  for x in out:
    x["loss_mask"] = np.ones((b, t), np.float32)
    x["segment_ids"] = np.ones((b, t), np.int32)
    x["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return out


def optim_config(total_steps: int, lr: float | None = None):
  import ml_collections
  o = dict(OPTIM, lr=lr or OPTIM["lr"])
  o["warmup_steps"] = int(o.pop("warmup_frac") * total_steps)
  return ml_collections.ConfigDict(dict(o, total_steps=total_steps))


class MedjaxTrainer:
  """The `medjax train` step: sharded state on a 1-device mesh, jitted, state donated."""

  def __init__(self, cfg, params, steps: int, lr: float | None = None):
    import jax
    from medjax.parallel import sharding
    from medjax.training import optim, state, step
    self.cfg = cfg
    pshape = jax.eval_shape(lambda: params)
    self.opt, self.sched = optim.make_optimizer(optim_config(steps, lr), cfg, pshape)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.state, shardings = state.shard_params_state(params, cfg, self.opt, mesh)
    self.step_fn = step.jit_train_step(cfg, self.opt, self.sched, mesh, shardings)
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
  """transformers' LlamaForCausalLM + torch.optim.AdamW, the same schedule and clipping.

  On CUDA: the fused AdamW (transformers' default optimizer there) and bf16 autocast over
  f32 weights when `dtype` is bfloat16, as medjax's f32 weights with bf16 activations.
  """

  def __init__(self, model, steps: int, dtype: str = "float32", lr: float | None = None):
    import contextlib
    import torch
    from medjax.training import optim
    self.m = model.train()
    self.device = next(model.parameters()).device
    cuda = self.device.type == "cuda"
    self.autocast = (torch.autocast("cuda", dtype=getattr(torch, dtype))
                     if cuda and dtype != "float32" else contextlib.nullcontext())
    o = optim_config(steps, lr)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, **({"fused": True} if cuda else {}))
    sched = optim.learning_rate_schedule(o)
    # optax evaluates the schedule at the update count (0 first), as LambdaLR does.
    lrs = [float(sched(i)) / o.lr for i in range(steps + 2)]
    self.lr = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: lrs[min(i, len(lrs) - 1)])
    self.clip = o.clip_norm
    self.params = list(model.parameters())

  def step(self, batch) -> float:
    import torch
    import torch.nn.functional as F
    inputs, targets, mask = (torch.from_numpy(batch[k]).to(self.device)
                             for k in ("inputs", "targets", "loss_mask"))
    inputs, targets = inputs.long(), targets.long()
    self.opt.zero_grad(set_to_none=True)
    with self.autocast:
      logits = self.m(input_ids=inputs).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.lr.step()
    return loss.item()
