"""The train state {step, params, opt_state, rng, skipped}, its logical axes, and creating it
sharded: no device ever holds all of it, and each shard is computed where it lives.

The parallel layer knows nothing of the model; here the model's axis names
(`llama.param_axes`) meet the mesh and rules (`parallel.sharding`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from medjax.model import llama
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig
from medjax.parallel import sharding
from medjax.parallel.sharding import DEFAULT_RULES


def init_state(params, optimizer, seed: int) -> dict[str, Any]:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.PRNGKey(seed),
      "skipped": jnp.zeros((), jnp.int32),
  }


def abstract_state(cfg: LlamaConfig, optimizer, seed: int = 0):
  """ShapeDtypeStructs of the train state (nothing allocated)."""
  return jax.eval_shape(lambda: init_state(llama.init_params(cfg, jax.random.PRNGKey(seed)),
                                           optimizer, seed))


def state_axes(cfg: LlamaConfig, optimizer, seed: int = 0):
  """Logical axes for every leaf of the train state.

  Optimizer moments are params-shaped dicts nested inside optax states, so a leaf whose
  dict-key path ends with a param's path takes that param's axes; the rest replicate.
  """
  axes = params_lib.flatten(llama.param_axes(cfg))

  def leaf_axes(path, x):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
      hit = axes.get("/".join(keys[i:]))
      if hit is not None and len(hit) == len(x.shape):
        return hit
    return (None,) * len(x.shape)

  return jax.tree_util.tree_map_with_path(leaf_axes, abstract_state(cfg, optimizer, seed))


def state_shardings(cfg: LlamaConfig, optimizer, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of the train state (optimizer moments follow their params)."""
  return sharding.tree_shardings(mesh, state_axes(cfg, optimizer), rules,
                                 shapes=abstract_state(cfg, optimizer))


def sharded_init(cfg: LlamaConfig, optimizer, mesh: Mesh, rules=DEFAULT_RULES, seed: int = 0):
  """A fresh train state created already sharded; no device ever holds all of it.

  Equals `init_state(init_params(cfg, PRNGKey(seed)), optimizer, seed)` value for value.

  Returns:
    (state, shardings): the state and the matching pytree of NamedSharding.
  """
  shardings = state_shardings(cfg, optimizer, mesh, rules)

  def init():
    return init_state(llama.init_params(cfg, jax.random.PRNGKey(seed)), optimizer, seed)

  # out_shardings makes XLA compute each shard where it lives (random bits included).
  return jax.jit(init, out_shardings=shardings)(), shardings


def shard_params_state(params, cfg: LlamaConfig, optimizer, mesh: Mesh, rules=DEFAULT_RULES,
                       seed: int = 0):
  """A train state around existing params (e.g. restored or imported), sharded.

  Params already laid out as the rules say (restore_params(..., shardings=param_shardings))
  are not moved; others are put in place first. The params buffers are donated: use the
  returned state's params, not the ones passed in.

  Returns:
    (state, shardings) as `sharded_init`.
  """
  shardings = state_shardings(cfg, optimizer, mesh, rules)
  params = jax.device_put(params, shardings["params"])
  init = jax.jit(lambda p: init_state(p, optimizer, seed), in_shardings=(shardings["params"],),
                 out_shardings=shardings, donate_argnums=0)
  return init(params), shardings
