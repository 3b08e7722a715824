"""The layout of a model's params: nested dicts with `/`-joined paths, in one of two layouts.

`layers_{i}/...` (unscanned) and `layers/...` (stacked over a leading layer axis, for
`nn.scan`) convert into each other, so a checkpoint loads whatever `scan_layers` a run uses.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from medjax.errors import CheckpointError
from medjax.model.config import LlamaConfig


def flatten(tree, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, p + "/"))
    else:
      out[p] = v
  return out


def unflatten(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def stack_layers(params: dict, n_layers: int) -> dict:
  """layers_{i}/x (n of them) -> layers/x with a leading [n] axis."""
  flat = flatten(params)
  out, per = {}, {}
  for k, v in flat.items():
    m = re.match(r"layers_(\d+)/(.*)", k)
    if m:
      per.setdefault(m.group(2), {})[int(m.group(1))] = v
    else:
      out[k] = v
  for sub, by_i in per.items():
    if sorted(by_i) != list(range(n_layers)):
      raise CheckpointError(f"params: layers for {sub!r} are {sorted(by_i)}, expected {n_layers}")
    out[f"layers/{sub}"] = jnp.stack([by_i[i] for i in range(n_layers)])
  return unflatten(out)


def unstack_layers(params: dict) -> dict:
  flat = flatten(params)
  out = {}
  for k, v in flat.items():
    if k.startswith("layers/"):
      for i in range(v.shape[0]):
        out[f"layers_{i}/{k[len('layers/'):]}"] = v[i]
    else:
      out[k] = v
  return unflatten(out)


def is_scanned(params: dict) -> bool:
  return "layers" in params


def to_layout(params: dict, cfg: LlamaConfig) -> dict:
  if cfg.scan_layers and not is_scanned(params):
    return stack_layers(params, cfg.num_hidden_layers)
  if not cfg.scan_layers and is_scanned(params):
    return unstack_layers(params)
  return params


def check_shapes(params: dict, cfg: LlamaConfig, source: str) -> None:
  """Refuses params whose names or shapes differ from what `cfg` builds."""
  from medjax.model import llama as model_lib  # local: avoid import cycle at module load
  want = flatten(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  got = flatten(params)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise CheckpointError(f"{source}: parameter names differ from the model config "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
  for k, w in want.items():
    if tuple(got[k].shape) != tuple(w.shape):
      raise CheckpointError(f"{source}: parameter {k} has shape {tuple(got[k].shape)}, the model "
                            f"config needs {tuple(w.shape)}")




def param_shardings(cfg: LlamaConfig, mesh, rules=None):
  """NamedSharding per param, in `cfg`'s layout (scanned or not), from the model's logical
  axis names and the rules (default: `parallel.sharding.DEFAULT_RULES`)."""
  from medjax.model import llama as model_lib
  from medjax.parallel import sharding
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  return sharding.tree_shardings(mesh, model_lib.param_axes(cfg),
                                 rules or sharding.DEFAULT_RULES, shapes=shapes)
