"""A medjax model directory: `model_config.json`, orbax `params/`, optional tokenizer
(`tokenizer.model`, or `tokenizer.json` with its `tokenizer_config.json`).

`import-hf` writes one; a training workdir holds the same files per checkpoint. Params are
restored in the layout (`model.params`) the caller's config asks for.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from medjax.checkpoints import orbax_logs
from medjax.data.tokenizer import copy_tokenizer, find_tokenizer
from medjax.errors import CheckpointError
from medjax.model import config as config_lib
from medjax.model.config import LlamaConfig
from medjax.model.params import check_shapes, flatten, is_scanned, to_layout, unflatten

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


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model dir (config.json), not a medjax one."""
  return os.path.exists(os.path.join(path, "config.json")) and not is_model_dir(path)


def load_config(path: str) -> LlamaConfig:
  p = os.path.join(path, MODEL_CONFIG)
  if not os.path.exists(p):
    raise CheckpointError(f"{path}: no {MODEL_CONFIG} (not a medjax checkpoint)")
  with open(p) as f:
    return config_lib.from_json(f.read(), source=p)


def restore_params(path: str, cfg: LlamaConfig | None = None, shardings=None) -> dict:
  """Restores params of a model dir, in `cfg`'s layout (stored config if None).

  shardings: optional pytree of NamedSharding matching `cfg`'s layout, so each device
  reads only its slices. The stored layout may differ (`import-hf` stores per-layer
  arrays; a scanned run wants them stacked): each array is then read straight onto the
  matching slice of the mesh and the layers are stacked (or split) there, one param at a
  time. Without shardings, arrays land on the default device.
  """
  stored = load_config(path)
  cfg = cfg or stored
  pdir = os.path.join(path, PARAMS)
  ckptr = ocp.StandardCheckpointer()
  try:
    tree = _as_dict(saved_tree(pdir, ckptr))
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), jnp.dtype(cfg.param_dtype)), tree)
    relayout = shardings is not None and is_scanned(abstract) != cfg.scan_layers
    if shardings is not None:
      place = _stored_shardings(abstract, shardings) if relayout else shardings
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, place)
    params = ckptr.restore(pdir, abstract)
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types for a damaged directory
    raise CheckpointError(f"{pdir}: cannot restore params ({type(e).__name__}: {e})") from None
  params = _as_dict(params)
  params = _relayout(params, cfg, shardings) if relayout else to_layout(params, cfg)
  check_shapes(params, cfg, pdir)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params


def _stored_shardings(stored: dict, shardings: dict) -> dict:
  """Shardings for the stored layout, from the wanted layout's: a per-layer array takes its
  stacked param's sharding without the layer axis, and a stacked array its per-layer
  param's with a replicated layer axis."""
  want = flatten(shardings)
  out = {}
  for path in flatten(stored):
    m = re.fullmatch(r"layers_(\d+)/(.*)", path)
    if m:  # stored per layer, wanted stacked
      sh = want[f"layers/{m.group(2)}"]
      out[path] = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
    elif path.startswith("layers/"):  # stored stacked, wanted per layer
      sh = want[f"layers_0/{path[len('layers/'):]}"]
      out[path] = NamedSharding(sh.mesh, P(None, *tuple(sh.spec)))
    else:
      out[path] = want[path]
  return unflatten(out)


def _relayout(params: dict, cfg: LlamaConfig, shardings: dict) -> dict:
  """Stacks per-layer arrays (or splits stacked ones) on the mesh, param by param, each
  result laid out as `shardings` says; the inputs are freed as it goes."""
  flat, want = flatten(params), flatten(shardings)
  n = cfg.num_hidden_layers
  out = {k: v for k, v in flat.items() if not k.startswith("layers")}
  if cfg.scan_layers:
    for path, sh in want.items():
      if path.startswith("layers/"):
        sub = path[len("layers/"):]
        parts = [flat.pop(f"layers_{i}/{sub}") for i in range(n)]
        out[path] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sh)(*parts)
        del parts
  else:
    for path, x in list(flat.items()):
      if path.startswith("layers/"):
        sub = path[len("layers/"):]
        shs = tuple(want[f"layers_{i}/{sub}"] for i in range(n))
        pieces = jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=shs)(x)
        out.update({f"layers_{i}/{sub}": p for i, p in enumerate(pieces)})
        del flat[path], x, pieces
  return unflatten(out)


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
