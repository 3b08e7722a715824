"""What the processes of a multi-process job agree on: the run they were started with, and
the step a preemption stops them at.

Every host runs the same command, so a host given a different config would compute another
model or hang in a collective nobody else enters; `check_same` refuses that at start, naming
the first field that differs. A SIGTERM (TPU maintenance, preemption) reaches one host or
all of them at slightly different steps; `Preemption` makes every process stop, and
checkpoint, at the same step. Both go through jax's multi-process runtime (collectives and
its preemption sync manager); nothing here builds another.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import numpy as np

from medjax.errors import ConfigError


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of nested dicts, leaves as JSON would write them."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (two small collectives)."""
  from jax.experimental import multihost_utils
  sizes = multihost_utils.process_allgather(np.array([len(data)], np.int32))
  buf = np.zeros(int(np.max(sizes)), np.uint8)
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  rows = multihost_utils.process_allgather(buf)  # [processes, longest]
  return [bytes(rows[i, : int(np.ravel(sizes)[i])]) for i in range(rows.shape[0])]


def check_same(fields: dict[str, Any], what: str = "config") -> None:
  """Refuses to go on unless every process passed the same `fields`.

  Args:
    fields: nested dicts of JSON-able values (a run config's `to_dict()`, flags).
    what: how the error names them.
  Raises:
    ConfigError on every process, naming the first differing field (sorted order) and each
    process's value, e.g. `config differs between processes: optim.lr is 0.001 on process
    0 and 0.002 on process 1`.
  """
  if jax.process_count() == 1:
    return
  mine = _flat(fields)
  blobs = _allgather_bytes(json.dumps(mine, sort_keys=True).encode())
  if all(b == blobs[0] for b in blobs):
    return
  each = [json.loads(b) for b in blobs]
  missing = object()
  for key in sorted(set().union(*each)):
    values = [e.get(key, missing) for e in each]
    if any(v != values[0] for v in values):
      shown = " and ".join(f"{'(absent)' if v is missing else json.dumps(v)} on process {i}"
                           for i, v in _distinct(values))
      raise ConfigError(f"{what} differs between processes: {key} is {shown}; start every "
                        "process with the same command")
  raise ConfigError(f"{what} differs between processes")  # unreachable: blobs differ


def _distinct(values: list) -> list[tuple[int, Any]]:
  """(first process, value) for each distinct value, process 0's first."""
  out: list[tuple[int, Any]] = []
  for i, v in enumerate(values):
    if all(v != w for _, w in out):
      out.append((i, v))
  return out


class Preemption:
  """Stops a training loop at a step every process agrees on, after a SIGTERM to any of them.

  One process: a Python SIGTERM handler sets a flag; the step in progress is the stop step.
  Several: `jax.distributed.initialize` installed jax's preemption sync manager, which
  catches SIGTERM in whichever processes get it and tells the others through the
  coordinator; they agree on the step after the furthest one any of them has reported, and
  `reached` turns True at that step on every process (as orbax's
  `CheckpointManager.reached_preemption` does). Python's own handler is then left out, since
  it would take the signal from jax's.

  Use as a context manager around the loop and call `reached(step)` once per step, with
  increasing steps.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    self._flag = False
    self._prev = None

  def __enter__(self):
    if not self.multi:
      try:
        self._prev = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread (e.g. some test runners)
        self._prev = None
    return self

  def _handler(self, signum, frame):
    self._flag = True

  def reached(self, step: int) -> bool:
    """True at the step where every process stops (the same step on all of them)."""
    if not self.multi:
      return self._flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)
