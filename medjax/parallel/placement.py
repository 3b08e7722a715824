"""Host rows in, host results out, for jitted functions over params laid out on a mesh.

Evaluation and generation read a few rows at a time on the host, run the model over params
sharded as training shards them, and bring small results back. With several processes each
process holds the same host rows: `rows` turns them into one global array split over the
mesh's batch axes (each process supplies its own devices' slices), and `jit` returns
results replicated, so that `fetch` reads them on every process. Without a placement
(`None`), callers keep using one device as before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.errors import ConfigError
from medjax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and its logical-axis rules (hashable, so jitted functions can be cached per
  placement)."""

  mesh: Mesh
  rules: tuple = sharding.DEFAULT_RULES

  def row_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
    """Rows [B, ...] split over the `batch` rule's axes (replicated over those that do not
    divide B)."""
    spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), self.rules,
                                    self.mesh, shape)
    return NamedSharding(self.mesh, spec)

  @property
  def everywhere(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def rows(self, x: np.ndarray) -> jax.Array:
    """A host array [B, ...] as a global array laid out by `row_sharding`. Every process
    passes the same array and supplies its own devices' slices."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.row_sharding(x.shape), lambda i: x[i])

  def replicated(self, x) -> jax.Array:
    """A host value, the same on every device."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.everywhere, lambda i: x[i])

  def jit(self, fn: Callable, **jit_kw) -> Callable:
    """`fn` jitted for this mesh: traced with the rules active (the model's activation
    constraints see the mesh), every output replicated."""
    @functools.wraps(fn)
    def traced(*args, **kw):
      with sharding.activate(self.mesh, self.rules):
        return fn(*args, **kw)

    return jax.jit(traced, out_shardings=self.everywhere, **jit_kw)


def fetch(x) -> np.ndarray:
  """A result on the host: local arrays as they are, global ones from a local replica."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(x.addressable_shards[0].data)


def parse_mesh(spec: str, flag: str = "--mesh") -> tuple[int, int, int]:
  """"DATA,FSDP,TENSOR" (one may be -1) -> three ints; ConfigError naming the flag."""
  parts = [p.strip() for p in str(spec).split(",")]
  try:
    sizes = tuple(int(p) for p in parts)
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise ConfigError(f"{flag} {spec!r}: expected DATA,FSDP,TENSOR sizes, e.g. 1,-1,1")
  return sizes


def make(spec: str | None = "1,-1,1", rules: Any = None, flag: str = "--mesh") -> Placement:
  """A placement over all devices of the job from a `--mesh` string and rule overrides."""
  mesh = sharding.make_mesh(*parse_mesh(spec or "1,-1,1", flag))
  return Placement(mesh, sharding.parse_rules(rules))
