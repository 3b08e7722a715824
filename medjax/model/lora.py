"""LoRA helpers: which params train, and merging adapters into plain weights for export."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medjax.model.config import LlamaConfig
from medjax.model.params import flatten, unflatten


def is_lora_path(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")


def trainable_mask(params: dict) -> dict:
  """True on LoRA adapters only (the base model stays frozen)."""
  return unflatten({k: is_lora_path(k) for k in flatten(params)})


def merge(params: dict, cfg: LlamaConfig) -> tuple[dict, LlamaConfig]:
  """W + (alpha/r) * A@B for each adapted projection; returns plain params and config."""
  if not cfg.lora_rank:
    return params, cfg
  flat = flatten(params)
  out = {}
  scale = cfg.lora_alpha / cfg.lora_rank
  for k, w in flat.items():
    if is_lora_path(k):
      continue
    if k.endswith("/w") and k[:-1] + "lora_a" in flat:
      a = flat[k[:-1] + "lora_a"]
      w = merge_weight(w, a, flat[k[:-1] + "lora_b"], scale,
                       lead=1 if a.ndim > 2 and cfg.scan_layers else 0)
    out[k] = w
  return unflatten(out), cfg.replace(lora_rank=0)


def merge_weight(w, a, b, scale: float, lead: int = 0):
  """W + scale·A@B for one adapted projection, in f32, back in W's dtype; numpy or jax
  arrays alike (export merges host arrays one layer at a time).

  a: [lead..., in..., R], b: [lead..., R, out...], w: [lead..., in..., out...], with `lead`
  leading layer axes (1 for a scanned stack).
  """
  a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]).astype(jnp.float32)
  b2 = b.reshape(*b.shape[:lead + 1], -1).astype(jnp.float32)
  if a2.shape[-2] * b2.shape[-1] * math.prod(a2.shape[:-2]) != w.size:
    raise ValueError(f"adapters give {a2.shape[-2]} x {b2.shape[-1]} per layer for a weight "
                     f"of shape {w.shape}")
  return (w.astype(jnp.float32) + scale * (a2 @ b2).reshape(w.shape)).astype(w.dtype)


def add_adapters(params: dict, cfg: LlamaConfig, rng) -> dict:
  """Adds fresh adapters to plain params: A ~ N(0, 1/fan_in), B = 0 (so the model is unchanged)."""
  from medjax.model import llama as model_lib
  shapes = flatten(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  flat = flatten(params)
  lead = 1 if cfg.scan_layers else 0
  for i, (k, sd) in enumerate(sorted(shapes.items())):
    if k.endswith("lora_a"):
      fan_in = int(np_prod(sd.shape[lead:-1]))
      flat[k] = (jax.random.normal(jax.random.fold_in(rng, i), sd.shape, jnp.float32)
                 / fan_in ** 0.5).astype(sd.dtype)
    elif k.endswith("lora_b"):
      flat[k] = jnp.zeros(sd.shape, sd.dtype)
  return unflatten(flat)


def np_prod(xs) -> int:
  n = 1
  for x in xs:
    n *= x
  return n
