"""Device mesh, logical-axis rules and NamedSharding builders.

The model names every parameter and activation dimension logically (`vocab`, `embed`,
`heads`, ...). A rules table from the run config maps each logical name to mesh axes, so a
change of layout (FSDP, FSDP+TP) is a config change. `constrain` is a no-op without a mesh.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Default: FSDP over `fsdp` (params sharded on embed), batch over data+fsdp, TP on heads/mlp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_state = threading.local()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1, meaning the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                      f"but {n} are present")
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU topologies: plain order is fine
    arr = np.array(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    names = (target,) if isinstance(target, str) else tuple(target)
    # Drop mesh axes of size 1 or already used, so specs stay valid for any mesh shape.
    names = tuple(a for a in names if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def tree_shardings(mesh: Mesh, axes_tree, rules=DEFAULT_RULES):
  """NamedSharding per leaf of a pytree of logical-axis tuples."""
  return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, rules, mesh)), axes_tree,
                      is_leaf=lambda a: isinstance(a, tuple))


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
  """Within this context `constrain` pins activations to the mesh."""
  prev = getattr(_state, "ctx", None)
  _state.ctx = (mesh, tuple(rules))
  try:
    yield
  finally:
    _state.ctx = prev


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  ctx = getattr(_state, "ctx", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
