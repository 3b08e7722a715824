"""A model's params one per-layer tensor at a time, read from a model dir or a training
workdir's checkpoint (`reader.ArrayReader`), never the whole model: what `export-hf` writes
from. A stacked (scanned) param gives one layer per read; per-layer params, one read each.

A workdir's checkpoint is checked against its stored fingerprint as it is read; `finish`
says whether every array read matched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from medjax.checkpoints import modeldir, reader
from medjax.checkpoints.manager import CKPT_DIR
from medjax.errors import CheckpointError
from medjax.model import lora

_LAYER = re.compile(r"layers_(\d+)/(.*)")


class ParamStream:
  """get(per-layer path) -> host array, e.g. get("layers_3/mlp/gate/w").

  Args:
    arrays: the reader of the params (`prefix` set for a train state).
    where: the directory, for messages.
    fingerprints: {param path: stored fingerprint}, or None (model dirs have none).
  """

  def __init__(self, arrays: reader.ArrayReader, where: str,
               fingerprints: dict[str, int] | None = None):
    self.arrays, self.where, self.want = arrays, where, fingerprints
    self._fp: dict[str, reader.Fingerprint] = {}
    self._next: dict[str, int] = {}  # stacked path -> next layer expected in order

  def has(self, path: str) -> bool:
    m = _LAYER.fullmatch(path)
    return path in self.arrays.paths or (m is not None and
                                         f"layers/{m.group(2)}" in self.arrays.paths)

  def get(self, path: str) -> np.ndarray:
    if path in self.arrays.paths:
      x = self.arrays.read(path)
      self._add(path, x, 0)
      return x
    m = _LAYER.fullmatch(path)
    stacked = f"layers/{m.group(2)}" if m else None
    if stacked not in self.arrays.paths:
      raise CheckpointError(f"{self.where}: no parameter {path}")
    i = int(m.group(1))
    x = self.arrays.read(stacked, i)
    self._add(stacked, x, i)
    return x

  def _add(self, path: str, x: np.ndarray, i: int) -> None:
    if self.want is None:
      return
    if self._next.get(path, 0) != i:  # out of order: cannot be accumulated; not checked
      self._fp.pop(path, None)
      self._next[path] = -1
      return
    self._fp.setdefault(path, reader.Fingerprint()).add(x)
    self._next[path] = i + 1

  def finish(self) -> None:
    """CheckpointError unless every fully read array matched its stored fingerprint."""
    if self.want is None:
      return
    for path, fp in self._fp.items():
      whole = (path in self.arrays.paths and
               (not path.startswith("layers/") or self._next[path] == self.arrays.shape(path)[0]))
      if whole and path in self.want and fp.value != self.want[path]:
        raise CheckpointError(f"{self.where}: {path} differs from the fingerprint written "
                              "at save time")


class LoraMerged:
  """A LoRA model's plain weights, one per-layer tensor at a time: W + (alpha/r)·A@B, with W
  from `base` and the adapters from `adapters` (one stream for a model dir holding both; a
  LoRA workdir's checkpoint holds the adapters only, its base is the run's `init_from`).
  The same sum as `lora.merge`, per layer, so export never holds the model.
  """

  def __init__(self, base, adapters: ParamStream, scale: float):
    self.base, self.adapters, self.scale = base, adapters, scale
    self.where = adapters.where

  def get(self, path: str) -> np.ndarray:
    w = self.base.get(path)
    stem = path[:-1] if path.endswith("/w") else None
    if stem is None or not self.adapters.has(stem + "lora_a"):
      return w
    try:
      return lora.merge_weight(w, self.adapters.get(stem + "lora_a"),
                               self.adapters.get(stem + "lora_b"), self.scale)
    except ValueError as e:
      raise CheckpointError(f"{self.where}: {path}: {e}") from None

  def finish(self) -> None:
    self.adapters.finish()
    if self.base is not self.adapters:
      self.base.finish()


class HFParams:
  """get(per-layer path) of an HF dir's weights, one tensor read at a time (a LoRA run's
  base given as an HF dir)."""

  def __init__(self, cfg, hf_dir: str):
    from medjax.checkpoints import convert
    self._convert, self.cfg, self.where = convert, cfg, hf_dir
    self._index = convert.index_hf_params(cfg, hf_dir)

  def get(self, path: str) -> np.ndarray:
    if path not in self._index:
      raise CheckpointError(f"{self.where}: no tensor for {path}")
    return self._convert.read_hf_param(self.cfg, self._index[path])

  def finish(self) -> None:
    pass


def candidates(src: str) -> Iterator[ParamStream]:
  """Param streams to try in turn: a model dir's params, or a workdir's checkpoints newest
  first (the caller moves on to the next when one turns out damaged)."""
  if modeldir.is_model_dir(src):
    pdir = os.path.join(src, modeldir.PARAMS)
    yield ParamStream(reader.ArrayReader(pdir), pdir)
    return
  d = os.path.join(src, CKPT_DIR)
  for step in sorted((int(s) for s in os.listdir(d) if s.isdigit()), reverse=True):
    step_dir = os.path.join(d, str(step))
    sdir = os.path.join(step_dir, "state")
    try:
      arrays = reader.ArrayReader(sdir, ("params",))
      want = _param_fingerprints(step_dir, sdir)
    except CheckpointError as e:
      yield _Broken(str(e))
      continue
    yield ParamStream(arrays, step_dir, want)


class _Broken:
  """A checkpoint whose metadata cannot be read: fails on first use."""

  def __init__(self, msg: str):
    self.msg, self.where = msg, msg.split(":", 1)[0]

  def get(self, path):
    raise CheckpointError(self.msg)

  def finish(self):
    raise CheckpointError(self.msg)


def _param_fingerprints(step_dir: str, sdir: str) -> dict[str, int] | None:
  """{param path: fingerprint} from a step's metadata (the state's leaves in tree order,
  as `manager.fingerprint` lists them); None if it has none."""
  import jax
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      want = json.load(f).get("fingerprint")
  except (OSError, ValueError):
    return None
  if not want:
    return None
  try:
    tree = modeldir.saved_tree(sdir)
  except Exception as e:
    raise CheckpointError(f"{sdir}: unreadable metadata ({type(e).__name__})") from None
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if len(flat) != len(want):
    raise CheckpointError(f"{step_dir}: {len(want)} fingerprints for {len(flat)} arrays")
  out = {}
  for (path, _), fp in zip(flat, want):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] == "params":
      out["/".join(keys[1:])] = int(fp)
  return out
