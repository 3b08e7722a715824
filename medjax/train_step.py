"""Pure training/eval steps, the optimizer, and a sharded train state.

The state is a dict pytree {step, params, opt_state, rng, skipped}; `train_step(state, batch)
-> (state, metrics)` is jitted once with explicit shardings and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from medjax import lora, model as model_lib
from medjax.config import LlamaConfig
from medjax.modeldir import flatten, unflatten

Batch = dict[str, jax.Array]  # inputs, targets, loss_mask, segment_ids, positions: [B,T]


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
  decay = unflatten({k: (len(v.shape) >= 2 and not k.endswith("scale")) for k, v in flat.items()})
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


def init_state(params, optimizer, seed: int) -> dict[str, Any]:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.PRNGKey(seed),
      "skipped": jnp.zeros((), jnp.int32),
  }


def state_axes(cfg: LlamaConfig, optimizer, seed: int = 0):
  """Logical axes for every leaf of the train state.

  Optimizer moments are params-shaped dicts nested inside optax states, so a leaf whose
  dict-key path ends with a param's path takes that param's axes; the rest replicate.
  """
  axes = flatten(model_lib.param_axes(cfg))
  abstract = jax.eval_shape(
      lambda: init_state(model_lib.init_params(cfg, jax.random.PRNGKey(0)), optimizer, seed))

  def leaf_axes(path, x):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
      hit = axes.get("/".join(keys[i:]))
      if hit is not None and len(hit) == len(x.shape):
        return hit
    return (None,) * len(x.shape)

  return jax.tree_util.tree_map_with_path(leaf_axes, abstract)


def token_nll(cfg: LlamaConfig, params, batch: Batch) -> jax.Array:
  """Per-token negative log-likelihood [B,T] (f32) of batch['targets']."""
  logits = model_lib.forward(cfg, params, batch["inputs"], positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"))
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return logz - tgt


def loss_sums(params, batch: Batch, cfg: LlamaConfig):
  """(sum of masked NLL, number of counted tokens); sums, so means are over the global batch."""
  nll = token_nll(cfg, params, batch)
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def train_step(state, batch: Batch, *, cfg: LlamaConfig, optimizer, schedule,
               accum_steps: int = 1):
  """One optimizer update over the global batch, accumulated over `accum_steps` micro-batches.

  The loss is sum(NLL * mask) / sum(mask) over the whole global batch, whatever the split.
  A non-finite loss or gradient is never applied: the step is skipped and counted
  (metrics["finite"] is False; the loop decides whether to stop).
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, cfg=cfg), has_aux=True)
  params = state["params"]
  if accum_steps == 1:
    (loss_sum, count), grads = grad_fn(params, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps,
                                             *x.shape[1:]), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, mb):
      g_acc, l_acc, c_acc = carry
      (l, c), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

    (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = loss_sum / denom
  gnorm = _global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = optimizer.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = {
      "step": state["step"] + 1,
      "params": keep(new_params, params),
      "opt_state": keep(new_opt, state["opt_state"]),
      "rng": state["rng"],
      "skipped": state["skipped"] + (~ok).astype(jnp.int32),
  }
  metrics = {"loss": loss, "grad_norm": gnorm, "tokens": count, "lr": schedule(state["step"]),
             "finite": ok}
  return new_state, metrics


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def eval_step(params, batch: Batch, *, cfg: LlamaConfig):
  """(sum NLL, token count) on one batch, for validation loss/perplexity."""
  return loss_sums(params, batch, cfg)
