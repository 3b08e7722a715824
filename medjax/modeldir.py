"""A medjax model directory: `model_config.json`, orbax `params/`, optional `tokenizer.model`.

`import-hf` writes one; a training workdir holds the same files per checkpoint. Params are
nested dicts; `layers_{i}/...` (unscanned) and `layers/...` (stacked, scanned) layouts convert
into each other so a checkpoint loads whatever `scan_layers` the run uses.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medjax import config as config_lib
from medjax.config import LlamaConfig
from medjax.errors import CheckpointError

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
TOKENIZER = "tokenizer.model"


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
  from medjax import model as model_lib  # local: avoid import cycle at module load
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


def save(out_dir: str, cfg: LlamaConfig, params: dict, tokenizer: str | None = None) -> None:
  """Writes a model dir atomically: built in `out_dir.tmp`, then renamed."""
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
    f.write(config_lib.to_json(cfg))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(tmp, PARAMS), params)
  ckptr.wait_until_finished()
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER))
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def is_model_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(
      os.path.join(path, PARAMS))


def load_config(path: str) -> LlamaConfig:
  p = os.path.join(path, MODEL_CONFIG)
  if not os.path.exists(p):
    raise CheckpointError(f"{path}: no {MODEL_CONFIG} (not a medjax checkpoint)")
  with open(p) as f:
    return config_lib.from_json(f.read(), source=p)


def restore_params(path: str, cfg: LlamaConfig | None = None, shardings=None) -> dict:
  """Restores params of a model dir, in `cfg`'s layout (stored config if None).

  shardings: optional pytree of NamedSharding matching `cfg`'s layout, so each device
  reads only its slices. Without it, arrays land on the default device.
  """
  stored = load_config(path)
  cfg = cfg or stored
  pdir = os.path.join(path, PARAMS)
  ckptr = ocp.StandardCheckpointer()
  try:
    tree = saved_tree(pdir, ckptr)
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jnp.dtype(cfg.param_dtype)),
        _as_dict(tree))
    if shardings is not None and is_scanned(abstract) == cfg.scan_layers:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    params = ckptr.restore(pdir, abstract)
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types for a damaged directory
    raise CheckpointError(f"{pdir}: cannot restore params ({type(e).__name__}: {e})") from None
  params = to_layout(_as_dict(params), cfg)
  check_shapes(params, cfg, pdir)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params


def saved_tree(path: str, checkpointer=None):
  """The metadata tree (shape and dtype per array) of an orbax pytree checkpoint dir; orbax
  releases return it bare or under `.item_metadata` / `.tree`."""
  md = (checkpointer or ocp.PyTreeCheckpointer()).metadata(path)
  return getattr(md, "item_metadata", None) or getattr(md, "tree", None) or md


def _as_dict(tree):
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  if hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))
