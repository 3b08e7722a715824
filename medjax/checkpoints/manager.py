"""Training checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints`.

Each step holds the train state (params, optimizer state, step, rng), the data iterator state
and the metrics at that step, plus a fingerprint of the state. Orbax writes each step to
`STEP.orbax-checkpoint-tmp` and renames it when complete, so a crash never leaves a
half-written step that looks finished; leftover tmp dirs are removed at start.

Retention is orbax's own preservation policy: the newest `keep` steps plus the best by
validation loss (`LatestN` or `BestN`; the val loss travels as the step's orbax metrics, so
the best is known again after a restart). Orbax deletes older steps only after a newer one
has been committed (in its save finalization), so a crash or a failed save (disk full)
always leaves `keep` good steps. A step that fails to restore, or whose restored state does not match
its fingerprint (truncated or corrupted files), is reported by path, renamed `STEP.corrupt`,
and the previous one is used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from medjax.model import lora
from medjax.model import params as params_lib
from medjax.checkpoints import modeldir, orbax_logs
from medjax.model.config import LlamaConfig
from medjax.errors import CheckpointError

CKPT_DIR = "checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


@jax.jit
def fingerprint(tree) -> jax.Array:
  """[num_leaves] uint32: a position-weighted sum of each leaf's bits (mod 2**32).

  Exact (integer arithmetic, any reduction order), elementwise until the final sum, so it
  runs on sharded arrays without gathering them. Detects flipped, zeroed or moved values.
  """
  out = []
  for x in jax.tree.leaves(tree):
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
    idx = jnp.zeros(x.shape, jnp.uint32)
    for d in range(x.ndim):  # row-major linear index, without reshaping a sharded array
      idx = idx * jnp.uint32(x.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
    out.append(jnp.sum(bits * (idx * jnp.uint32(2654435761) + 1), dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def _host_fingerprint(tree) -> list[int]:
  return [int(v) for v in jax.device_get(fingerprint(tree))]


def _val_loss(metrics) -> float:
  """A step's validation loss for retention; steps saved without one rank last."""
  v = (metrics or {}).get("val_loss")
  return float("inf") if v is None else float(v)


def stacked_save_args(state):
  """Orbax save args that store each layer of a layer-stacked array (`layers/...` params
  and their optimizer moments) in chunks of its own, so one layer reads back without
  decoding the others (`reader.ArrayReader`: export-hf streams layer by layer)."""
  def args(path, x):
    stacked = any(getattr(k, "key", None) == "layers" for k in path) and x.ndim >= 2
    if not stacked:
      return ocp.SaveArgs()
    shard = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    layer_bytes = math.prod(shard[1:]) * x.dtype.itemsize
    return ocp.SaveArgs(chunk_byte_size=max(layer_bytes, 1), shard_axes=(0,))

  return jax.tree_util.tree_map_with_path(args, state)


class SavedState:
  """What a checkpoint holds of the train state.

  Everything, except under LoRA: the frozen base weights are left out (a 7B base is ~28 GB
  per checkpoint; its adapters are ~0.1%); they are re-read from the run's `init_from` on
  resume (`complete`) and by `restore_workdir_params` for eval/export.
  """

  def __init__(self, cfg: LlamaConfig):
    self.partial = bool(cfg.lora_rank)

  def select(self, state: dict) -> dict:
    if not self.partial:
      return state
    flat = params_lib.flatten(state["params"])
    return {**state, "params": params_lib.unflatten(
        {k: v for k, v in flat.items() if lora.is_lora_path(k)})}

  def complete(self, saved: dict, fresh: dict) -> dict:
    """`saved` (adapters, optimizer state, step, rng) on top of `fresh`'s base weights."""
    params = {**params_lib.flatten(fresh["params"]), **params_lib.flatten(saved["params"])}
    return {**saved, "params": params_lib.unflatten(params)}


class Checkpointer:
  """Save/restore of (state, data state) in a workdir."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(workdir, CKPT_DIR)
    self.keep = max(int(keep), 1)
    self._pending: int | None = None  # step of the save in flight
    orbax_logs.install()  # again: a test runner may have replaced sys.unraisablehook since
    try:
      # best_fn makes orbax write each step's metrics; the policy decides what stays.
      retention = ocm.AnyPreservationPolicy([
          ocm.LatestN(n=self.keep),
          ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=1,  # reverse: lowest last
                    keep_checkpoints_without_metrics=False)])
      self._mngr = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
              best_fn=_val_loss, best_mode="min", preservation_policy=retention),
          item_names=("state", "data", "meta"))
    except OSError as e:
      raise CheckpointError(f"{self.directory}: cannot create the checkpoint directory "
                            f"({e.strerror or e})") from e

  def all_steps(self) -> list[int]:
    """Finished steps (orbax ignores tmp and `.corrupt` dirs)."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, data_state, meta: dict) -> None:
    """Starts an (async) save. The previous save must have landed (it is waited for here;
    its failure is raised now); orbax deletes steps beyond retention once this one lands."""
    self.wait()
    val = meta.get("val_loss")
    meta = {**meta, "fingerprint": _host_fingerprint(state)}
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state, save_args=stacked_save_args(state)),
          data=ocp.args.JsonSave(data_state if data_state is not None else {}),
          meta=ocp.args.JsonSave(meta)), force=True,
          metrics={} if val is None else {"val_loss": float(val)})
    except Exception as e:  # a synchronous part failed (e.g. mkdir on a full disk)
      self._failed(step, e)
    self._pending = step

  def _failed(self, step: int, e: Exception):
    self._pending = None
    good = [s for s in self._safe_steps() if s != step]
    self._remove_tmp(step)
    prev = (f"the previous checkpoint {os.path.join(self.directory, str(good[-1]))} is intact"
            if good else "no earlier checkpoint exists")
    msg = " ".join(str(e).split())
    if "os_error_code" in msg:  # tensorstore: the OS error is the last clause
      msg = msg.rsplit(": ", 1)[-1]
    raise CheckpointError(f"{os.path.join(self.directory, str(step))}: checkpoint could not be "
                          f"written ({type(e).__name__}: {msg[:300]}); {prev}") from e

  def _safe_steps(self) -> list[int]:
    try:
      return self.all_steps()
    except Exception:  # reporting a failure must not fail itself
      return []

  def wait(self) -> None:
    """Blocks until the save in flight has landed; CheckpointError if it failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      if self._pending is None:
        raise
      self._failed(self._pending, e)
    self._pending = None

  def restore_latest(self, abstract_state):
    """(step, state, data_state) of the newest step that restores, or None if none exist.

    abstract_state: ShapeDtypeStructs with shardings; the state is placed on them, so a run
    may resume on a different mesh or device count.
    """
    for step in reversed(self.all_steps()):
      path = os.path.join(self.directory, str(step))
      try:
        got = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        want = (got["meta"] or {}).get("fingerprint")
        if want is not None:
          have = _host_fingerprint(got["state"])
          bad = [i for i, (a, b) in enumerate(zip(have, want)) if a != b]
          if bad or len(have) != len(want):
            leaf = jax.tree_util.tree_flatten_with_path(abstract_state)[0][bad[0] if bad else 0]
            raise CheckpointError(f"restored values differ from the fingerprint written at "
                                  f"save time (first at {jax.tree_util.keystr(leaf[0])})")
        return step, got["state"], got["data"] or None
      except Exception as e:  # a damaged step: say which, move it aside, use the one before
        mismatch = self._mismatch(step, abstract_state)
        if mismatch:  # not damage: the workdir belongs to another model or optimizer
          raise CheckpointError(f"{path}: {mismatch}; use a new --workdir for a different "
                                "model or optimizer") from e
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        _log(f"warning: checkpoint {path} is corrupt ({msg}); moved to {path}.corrupt, "
             "using the previous one")
        self._quarantine(step)
    return None

  def _mismatch(self, step: int, abstract_state) -> str | None:
    """Why the saved state's shapes differ from `abstract_state`, or None if they agree or
    the step's metadata is unreadable (then the step is damaged)."""
    try:
      tree = modeldir.saved_tree(os.path.join(self.directory, str(step), "state"))
      saved = jax.tree_util.tree_flatten_with_path(tree)[0]
      saved = [(jax.tree_util.keystr(p), tuple(m.shape)) for p, m in saved]
    except Exception:
      return None
    want = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract_state))
    if sorted(s for _, s in saved) == want:
      return None
    for name, shape in saved:
      if shape not in want:
        return f"saved state has {name} of shape {shape}, which this config does not build"
      want.remove(shape)
    return f"saved state has {len(saved)} arrays, this config builds {len(saved) + len(want)}"

  def _quarantine(self, step: int) -> None:
    """Renames a damaged step out of orbax's view, so its number can be saved again."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = src + ".corrupt"
      shutil.rmtree(dst, ignore_errors=True)
      try:
        os.replace(src, dst)
      except OSError:
        shutil.rmtree(src, ignore_errors=True)
    if jax.process_count() > 1:  # every host must see the rename before it reloads
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"medjax_quarantine_{step}")
    self._mngr.reload()

  def _remove_tmp(self, step: int) -> None:
    """Deletes a failed write's tmp dir (freeing the space it took). Orbax's other writer
    threads may still be finishing, so the manager is closed first and removal retried."""
    try:
      self._mngr.close()
    except Exception:
      pass
    tmp = os.path.join(self.directory, f"{step}{TMP_SUFFIX}")
    for _ in range(50):
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.exists(tmp):
        return
      time.sleep(0.1)

  def abort(self) -> None:
    """On an error: lets a healthy save in flight land, removes a failed one's tmp dir,
    and closes without raising (the error being handled is the one to report)."""
    try:
      self._mngr.wait_until_finished()
    except Exception:
      if self._pending is not None:
        self._remove_tmp(self._pending)
    self._pending = None
    try:
      self._mngr.close()
    except Exception:
      pass

  def close(self) -> None:
    """Waits for the save in flight (CheckpointError if it failed), then closes."""
    try:
      self.wait()
    finally:
      self._mngr.close()


def read_step(step_dir: str) -> tuple[dict, dict]:
  """(state as saved, meta) of one step dir, checked against its fingerprint; no config
  needed (for tools that audit a workdir). CheckpointError if it is damaged."""
  try:
    # Onto one local device, whatever mesh wrote it (an audit needs no mesh).
    ckptr, sdir = ocp.PyTreeCheckpointer(), os.path.join(step_dir, "state")
    tree = modeldir._as_dict(modeldir.saved_tree(sdir, ckptr))
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=one), tree)
    state = ckptr.restore(sdir, args=ocp.args.PyTreeRestore(restore_args=args))
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      meta = json.load(f)
  except Exception as e:
    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    raise CheckpointError(f"{step_dir}: cannot be restored ({msg})") from None
  if "fingerprint" in meta and _host_fingerprint(state) != meta["fingerprint"]:
    raise CheckpointError(f"{step_dir}: restored values differ from the saved fingerprint")
  return state, meta
