"""Reading the params of a training workdir (`WORKDIR/checkpoints/STEP/state`) without its
optimizer state, checked against the step's fingerprint; a damaged step falls back to the
one before, moving nothing (eval and export must not change a run's directory)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from medjax.checkpoints import modeldir
from medjax.checkpoints.manager import CKPT_DIR, _host_fingerprint, _log
from medjax.errors import CheckpointError
from medjax.model import lora
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig


def latest_model_dir(path: str) -> str | None:
  """For a training workdir: the workdir itself when it has checkpoints and a model config."""
  d = os.path.join(path, CKPT_DIR)
  if os.path.isdir(d) and os.path.exists(os.path.join(path, modeldir.MODEL_CONFIG)):
    steps = [int(s) for s in os.listdir(d) if s.isdigit()]
    return path if steps else None
  return None


def restore_workdir_params(workdir: str, cfg: LlamaConfig, shardings=None,
                           lora_base=None) -> dict:
  """Params of the newest restorable checkpoint in a workdir (optimizer state not read).

  lora_base(workdir, adapters, shardings) -> full params: a LoRA run's checkpoints hold
  only its adapters; this rebuilds the frozen base they sit on, read straight onto
  `shardings` when given (`sources.restore` passes it).
  """
  d = os.path.join(workdir, CKPT_DIR)
  steps = sorted((int(s) for s in os.listdir(d) if s.isdigit()), reverse=True)
  stored = modeldir.load_config(workdir)
  for step in steps:
    sdir = os.path.join(d, str(step), "state")
    try:
      ckptr = ocp.PyTreeCheckpointer()
      tree = modeldir.saved_tree(sdir, ckptr)
      pmeta = modeldir._as_dict(tree)["params"]
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape),
                                                         jnp.dtype(stored.param_dtype)), pmeta)
      same_layout = (shardings is not None
                     and jax.tree.structure(item) == jax.tree.structure(shardings))
      # Read each array straight into its shards when the layouts agree (a pod never holds
      # the whole model on one device); otherwise restore, then place below.
      if same_layout:
        restore_args = jax.tree.map(
            lambda a, s: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=s), item, shardings)
      else:  # e.g. export on one host of a checkpoint written by a pod: one local device
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=one), item)
      got = ckptr.restore(sdir, args=ocp.args.PyTreeRestore(
          item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
      _check_params(os.path.join(d, str(step)), tree, got["params"])
      params = modeldir._as_dict(got["params"])
      if all(lora.is_lora_path(k) for k in params_lib.flatten(params)):  # adapters only
        if lora_base is None:
          raise CheckpointError(f"{workdir}: holds LoRA adapters only; its base is needed")
        params = lora_base(workdir, params, shardings)
      params = params_lib.to_layout(params, cfg)
      params_lib.check_shapes(params, cfg, sdir)
      return jax.device_put(params, shardings) if shardings is not None else params
    except CheckpointError:
      raise
    except Exception as e:
      msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
      _log(f"warning: checkpoint {sdir} is corrupt ({msg}); trying the previous one")
  raise CheckpointError(f"{workdir}: no checkpoint could be restored")


def _check_params(step_dir: str, saved_tree, params) -> None:
  """ValueError if restored params differ from their part of the step's fingerprint (the
  state's leaves in tree order; those under 'params' are contiguous)."""
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      want = json.load(f).get("fingerprint")
  except (OSError, ValueError):
    want = None
  if not want:  # written before fingerprints
    return
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved_tree)[0]]
  idx = [i for i, p in enumerate(paths) if p.startswith("['params']")]
  have = _host_fingerprint(params)
  if len(paths) != len(want) or [want[i] for i in idx] != have:
    raise ValueError("restored params differ from the fingerprint written at save time")
