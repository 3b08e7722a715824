"""Training checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints`.

Each step holds the train state (params, optimizer state, step, rng), the data iterator state
and the metrics at that step. Orbax writes each step to a temporary directory and renames it
when complete, so a crash never leaves a half-written step that looks finished. Retention:
the last `keep` steps plus the best by validation loss. A step that fails to restore is
reported and the previous one is used.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from medjax import modeldir
from medjax.config import LlamaConfig
from medjax.errors import CheckpointError

CKPT_DIR = "checkpoints"


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


class Checkpointer:
  """Save/restore of (state, data state) in a workdir (local path or gs://)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(workdir, CKPT_DIR)
    self.keep = keep
    self.best: tuple[float, int] | None = None
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save),
        item_names=("state", "data", "meta"))
    self._load_best()

  def _best_path(self):
    return os.path.join(self.directory, "best.json")

  def _load_best(self):
    try:
      with open(self._best_path()) as f:
        b = json.load(f)
      self.best = (b["val_loss"], b["step"])
    except (OSError, ValueError, KeyError):
      self.best = None

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, data_state, meta: dict) -> None:
    """Starts an (async) save; older steps beyond retention are deleted once it lands."""
    val = meta.get("val_loss")
    if val is not None and (self.best is None or val < self.best[0]):
      self.best = (float(val), int(step))
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._prune(step)

  def _prune(self, newest: int) -> None:
    steps = [s for s in self.all_steps() if s != newest]
    keep = set(steps[-(self.keep - 1):]) if self.keep > 1 else set()
    if self.best is not None:
      keep.add(self.best[1])
    for s in steps:
      if s not in keep:
        self._mngr.delete(s)
    if self.best is not None and jax.process_index() == 0:
      with open(self._best_path() + ".tmp", "w") as f:
        json.dump({"step": self.best[1], "val_loss": self.best[0]}, f)
      os.replace(self._best_path() + ".tmp", self._best_path())

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(step, state, data_state) of the newest step that restores, or None if none exist.

    abstract_state: ShapeDtypeStructs with shardings; the state is placed on them, so a run
    may resume on a different mesh or device count.
    """
    for step in reversed(self.all_steps()):
      try:
        got = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return step, got["state"], got["data"] or None
      except Exception as e:  # a damaged step: say which, fall back to the one before
        _log(f"warning: checkpoint {os.path.join(self.directory, str(step))} failed to "
             f"restore ({type(e).__name__}: {str(e)[:200]}); trying the previous one")
    return None

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def latest_model_dir(path: str) -> str | None:
  """For a training workdir: the workdir itself when it has checkpoints and a model config."""
  d = os.path.join(path, CKPT_DIR)
  if os.path.isdir(d) and os.path.exists(os.path.join(path, modeldir.MODEL_CONFIG)):
    steps = [int(s) for s in os.listdir(d) if s.isdigit()]
    return path if steps else None
  return None


def restore_workdir_params(workdir: str, cfg: LlamaConfig, shardings=None) -> dict:
  """Params of the newest restorable checkpoint in a workdir (optimizer state not read)."""
  d = os.path.join(workdir, CKPT_DIR)
  steps = sorted((int(s) for s in os.listdir(d) if s.isdigit()), reverse=True)
  stored = modeldir.load_config(workdir)
  for step in steps:
    sdir = os.path.join(d, str(step), "state")
    try:
      ckptr = ocp.PyTreeCheckpointer()
      meta = ckptr.metadata(sdir)
      tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
      pmeta = modeldir._as_dict(tree)["params"]
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape),
                                                         jnp.dtype(stored.param_dtype)), pmeta)
      restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype), item)
      got = ckptr.restore(sdir, args=ocp.args.PyTreeRestore(
          item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
      params = modeldir.to_layout(modeldir._as_dict(got["params"]), cfg)
      modeldir.check_shapes(params, cfg, sdir)
      return jax.device_put(params, shardings) if shardings is not None else params
    except CheckpointError:
      raise
    except Exception as e:
      _log(f"warning: checkpoint {sdir} failed to restore ({type(e).__name__}); "
           "trying the previous one")
  raise CheckpointError(f"{workdir}: no checkpoint could be restored")
