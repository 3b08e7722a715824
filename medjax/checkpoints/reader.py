"""Reading an orbax checkpoint's arrays one at a time, and a layer-stacked array one layer at
a time, without restoring the model: what `export-hf` streams from.

Orbax stores each array as a tensorstore array (zarr, usually inside an OCDBT database, one
per checkpoint, however many processes wrote it). orbax's own public helpers
(`type_handlers.get_json_tspec_read`, `get_ts_context`) give the tensorstore spec of an
array; reading `array[i]` then decodes only the chunks that hold layer i (training
checkpoints store one layer per chunk, `manager.stacked_save_args`), so host memory holds
about one layer of one param, whatever the model's depth.

`Fingerprint` recomputes, slice by slice, the per-array fingerprint a training checkpoint
stores (`manager.fingerprint`), so a streamed export still detects a damaged checkpoint.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medjax.errors import CheckpointError

_GOLDEN = np.uint32(2654435761)  # manager.fingerprint's multiplier
_BLOCK = 1 << 22  # elements per fingerprint block: bounds its temporaries (~50 MB)


class ArrayReader:
  """The arrays of one orbax pytree directory (a model dir's `params/`, a step's `state/`).

  Args:
    directory: the pytree checkpoint directory (holds `_METADATA`).
    prefix: keys in front of the paths asked for (`("params",)` inside a train state).
  """

  def __init__(self, directory: str, prefix: tuple[str, ...] = ()):
    import orbax.checkpoint as ocp
    self.directory, self.prefix = directory, prefix
    try:
      with open(os.path.join(directory, "_METADATA")) as f:
        md = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{directory}: no readable orbax metadata ({e})") from None
    self.use_ocdbt = bool(md.get("use_ocdbt", True))
    self.use_zarr3 = bool(md.get("use_zarr3", False))
    # Keys of every array, as "('params', 'layers', 'attn', 'q', 'w')" strings.
    keys = [tuple(k["key"] for k in v["key_metadata"]) for v in md["tree_metadata"].values()]
    self.all_keys = sorted(keys)
    n = len(prefix)
    self.paths = {"/".join(k[n:]): k for k in keys if k[:n] == prefix}
    self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
    self._open: dict = {}

  def _array(self, path: str):
    if path not in self.paths:
      raise CheckpointError(f"{self.directory}: no array {'/'.join(self.prefix + (path,))}")
    if path not in self._open:
      import orbax.checkpoint as ocp
      import tensorstore as ts
      from etils import epath
      info = ocp.type_handlers.ParamInfo(
          name=".".join(self.paths[path]), parent_dir=epath.Path(self.directory),
          is_ocdbt_checkpoint=self.use_ocdbt, use_zarr3=self.use_zarr3, ts_context=self._ctx)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
      try:
        self._open[path] = ts.open(spec, context=self._ctx).result()
      except Exception as e:  # missing or damaged files
        raise CheckpointError(f"{self.directory}: cannot open array {path} "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    return self._open[path]

  def shape(self, path: str) -> tuple[int, ...]:
    return tuple(self._array(path).shape)

  def read(self, path: str, index: int | None = None) -> np.ndarray:
    """The array at `path` (e.g. "layers/mlp/gate/w"), or its slice [index] on axis 0."""
    a = self._array(path)
    try:
      return np.asarray((a if index is None else a[index]).read().result())
    except Exception as e:
      raise CheckpointError(f"{self.directory}: cannot read array {path} "
                            f"({type(e).__name__}: {str(e)[:200]})") from None


class Fingerprint:
  """`manager.fingerprint` of one array, accumulated over consecutive slices on axis 0."""

  def __init__(self):
    self.total = np.uint32(0)
    self.offset = 0  # linear index of the next slice's first element

  def add(self, x: np.ndarray) -> None:
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
      flat = flat.astype(np.uint8)
    bits = flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize])
    with np.errstate(over="ignore"):
      for s in range(0, bits.size, _BLOCK):
        b = bits[s: s + _BLOCK].astype(np.uint32)
        idx = np.arange(self.offset + s, self.offset + s + b.size, dtype=np.uint64)
        idx = idx.astype(np.uint32)  # mod 2**32, as the jitted version wraps
        self.total = np.uint32(self.total + np.sum(b * (idx * _GOLDEN + np.uint32(1)),
                                                   dtype=np.uint32))
    self.offset += bits.size

  @property
  def value(self) -> int:
    return int(self.total)
