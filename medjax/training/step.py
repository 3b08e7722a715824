"""Pure training and eval steps, and the train step jitted once for a mesh.

The state is a dict pytree {step, params, opt_state, rng, skipped} (`training.state`);
`train_step(state, batch) -> (state, metrics)` is jitted once with explicit shardings and
the state donated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax.model import llama as model_lib
from medjax.model.config import LlamaConfig
from medjax.parallel import sharding

Batch = dict[str, jax.Array]  # inputs, targets, loss_mask, segment_ids, positions: [B,T]


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
  # tokens: loss-bearing; processed: every non-padding token the model ran on (SFT prompts
  # included), which is what throughput and MFU count.
  seg = batch.get("segment_ids")  # absent: every slot is a real token
  processed = (jnp.asarray(batch["inputs"].size, jnp.float32) if seg is None
               else jnp.sum((seg > 0).astype(jnp.float32)))
  metrics = {"loss": loss, "grad_norm": gnorm, "tokens": count, "processed": processed,
             "lr": schedule(state["step"]), "finite": ok}
  return new_state, metrics


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def eval_step(params, batch: Batch, *, cfg: LlamaConfig):
  """(sum NLL, token count) on one batch, for validation loss/perplexity."""
  return loss_sums(params, batch, cfg)


def jit_train_step(cfg, optimizer, schedule, mesh, shardings, rules=sharding.DEFAULT_RULES,
                   accum_steps: int = 1):
  """`train_step` jitted once for this mesh: explicit layouts, state donated.

  Args:
    shardings: the state's NamedShardings (from `sharded_init` / `shard_params_state`).
  Returns:
    step(state, batch) -> (state, metrics). The batch fields [B,T] are split on rows over
    the `batch` rule's axes; metrics come back replicated.
  """
  def step(state, batch):
    # Tracing happens inside this context, so the model's `constrain` calls see the mesh.
    with sharding.activate(mesh, rules):
      return train_step(state, batch, cfg=cfg, optimizer=optimizer, schedule=schedule,
                        accum_steps=accum_steps)

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


