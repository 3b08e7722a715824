"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, no weight
decay on norms and biases, and frozen params (LoRA's base, `frozen` prefixes) left untouched."""

from __future__ import annotations

from typing import Any

import jax
import optax

from medjax.errors import ConfigError
from medjax.model import lora
from medjax.model.config import LlamaConfig
from medjax.model.params import flatten, unflatten


def learning_rate_schedule(oc) -> optax.Schedule:
  """Linear warmup to `oc.lr`, then cosine decay to `oc.lr * oc.final_lr_ratio`."""
  warm = max(int(oc.warmup_steps), 0)
  decay = max(int(oc.total_steps) - warm, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warm else oc.lr, peak_value=oc.lr, warmup_steps=warm,
      decay_steps=warm + decay, end_value=oc.lr * oc.final_lr_ratio)


def trainable_mask(params, cfg: LlamaConfig, frozen: tuple[str, ...] = ()) -> Any:
  """True where a param trains: only LoRA adapters when LoRA is on; minus `frozen` prefixes."""
  flat = flatten(params)
  unknown = [f for f in frozen if not any(k == f or k.startswith(f.rstrip("/") + "/")
                                          for k in flat)]
  if unknown:  # a misspelt prefix would silently train what was meant to stay fixed
    raise ConfigError(f"config.frozen={','.join(frozen)!r}: {unknown[0]!r} is no param path "
                      f"prefix (params: {', '.join(sorted(flat)[:6])}, ...)")
  out = {}
  for k in flat:
    train = lora.is_lora_path(k) if cfg.lora_rank else True
    if any(k == f or k.startswith(f.rstrip("/") + "/") for f in frozen):
      train = False
    out[k] = train
  return unflatten(out)


def make_optimizer(oc, cfg: LlamaConfig, params_shape, frozen: tuple[str, ...] = ()):
  """AdamW with warmup+cosine, global-norm clipping, decay mask, frozen params untouched.

  oc: optimizer config fields lr, warmup_steps, total_steps, final_lr_ratio, b1, b2, eps,
  weight_decay, clip_norm.
  """
  sched = learning_rate_schedule(oc)
  flat = flatten(params_shape)
  # Matrices decay; norm scales and biases (Qwen2's q/k/v) do not, stacked over layers or not.
  decay = unflatten({k: len(v.shape) >= 2 and not k.endswith(("scale", "/b"))
                     for k, v in flat.items()})
  adamw = optax.chain(
      optax.clip_by_global_norm(oc.clip_norm) if oc.clip_norm else optax.identity(),
      optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                  mask=decay),
  )
  mask = trainable_mask(params_shape, cfg, frozen)
  if all(flatten(mask).values()):
    return adamw, sched
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), sched
