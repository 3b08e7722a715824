"""A medjax model directory: `model_config.json`, orbax `params/`, optional tokenizer
(`tokenizer.model`, or `tokenizer.json` with its `tokenizer_config.json`).

`import-hf` writes one; a training workdir holds the same files per checkpoint. Params are
restored in the layout (`model.params`) the caller's config asks for.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medjax.data.tokenizer import copy_tokenizer, find_tokenizer
from medjax.model import config as config_lib
from medjax.model.config import LlamaConfig
from medjax.model.params import check_shapes, is_scanned, to_layout
from medjax.checkpoints import orbax_logs
from medjax.errors import CheckpointError

orbax_logs.install()

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
TOKENIZER = "tokenizer.model"  # a SentencePiece model dir's; `tokenizer_path` finds either


def save(out_dir: str, cfg: LlamaConfig, params: dict, tokenizer: str | None = None) -> None:
  """Writes a model dir atomically: built in `out_dir.tmp`, then renamed.

  tokenizer: a tokenizer.model or tokenizer.json (its side files come along) to copy in.
  """
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
    copy_tokenizer(tokenizer, tmp)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def tokenizer_path(path: str) -> str | None:
  """The tokenizer file of a model dir, HF dir or workdir (`data.tokenizer.find_tokenizer`)."""
  return find_tokenizer(path)


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
