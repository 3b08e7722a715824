"""Device mesh, logical-axis rules and NamedSharding builders.

The model names every parameter and activation dimension logically (`vocab`, `embed`,
`heads`, ...). A rules table from the run config maps each logical name to mesh axes, so a
change of layout (FSDP, FSDP+TP) is a config change. `constrain` is a no-op without a mesh.
This module knows nothing of the model: callers pass trees of logical axis names.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import flax.linen as nn
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
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once.

  The assignment is flax's (`flax.linen.logical_to_mesh_axes`: rules in order of priority,
  a rule whose mesh axes are taken is skipped). What flax lacks, and this adds, is fitting
  the spec to a concrete mesh and array, so one rules table serves every mesh:
  mesh axes of size 1 are dropped from the rules first (a size-1 axis would otherwise
  block a rule), and with `shape`, a mesh axis that does not divide its dimension is dropped
  (that dimension is replicated over it; `assert_params_sharded` reports big params this hits).

  Args:
    axes: one logical name (or None) per array dim.
    rules: (logical name, mesh axis | tuple of axes | None) pairs.
    mesh: when given, mesh axes of size 1 are dropped so specs stay valid for any mesh.
    shape: when given (with mesh), mesh axes that do not divide their dim are dropped.
  Returns:
    The PartitionSpec.
  """
  if mesh is not None:
    rules = tuple((name, _live_axes(target, mesh)) for name, target in rules)
  spec = nn.logical_to_mesh_axes(tuple(axes), tuple(rules))
  out = []
  for i, target in enumerate(spec):
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept, prod = [], 1
    for a in names:
      size = 1 if mesh is None else mesh.shape[a]
      if shape is not None and mesh is not None and shape[i] % (prod * size):
        continue  # would split the dim unevenly: replicate over this axis
      kept.append(a)
      prod *= size
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def _live_axes(target, mesh: Mesh):
  """A rule's mesh axes without those of size 1 (None when nothing is left)."""
  if target is None:
    return None
  names = (target,) if isinstance(target, str) else tuple(target)
  live = tuple(a for a in names if mesh.shape[a] > 1)
  return None if not live else live[0] if len(live) == 1 else live


def tree_shardings(mesh: Mesh, axes_tree, rules=DEFAULT_RULES, shapes=None):
  """NamedSharding per leaf of a pytree of logical-axis tuples (shapes: matching pytree)."""
  # Axes are plain tuples of names; optax states are NamedTuples and must be traversed.
  is_axes = lambda a: (isinstance(a, tuple) and not hasattr(a, "_fields")
                       and all(x is None or isinstance(x, str) for x in a))
  if shapes is None:
    return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, rules, mesh)), axes_tree,
                        is_leaf=is_axes)
  return jax.tree.map(lambda a, x: NamedSharding(mesh, logical_to_spec(a, rules, mesh, x.shape)),
                      axes_tree, shapes, is_leaf=is_axes)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
  """Within this context `constrain` pins activations to the mesh."""
  prev = getattr(_state, "ctx", None)
  _state.ctx = (mesh, tuple(rules))
  try:
    yield
  finally:
    _state.ctx = prev


def current() -> tuple[Mesh, tuple] | None:
  """The (mesh, rules) `activate` set, or None (e.g. for kernels that need shard_map)."""
  return getattr(_state, "ctx", None)


def target_platform() -> str:
  """The platform the code being traced will run on: the active mesh's devices (libtpu's
  compile-only devices under `medjax fit`), else the default backend ("cpu", "tpu", ...)."""
  ctx = current()
  return ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def parse_rules(rules=None) -> tuple[tuple[str, Any], ...]:
  """The rules table a run config asks for, checked against the known names.

  Args:
    rules: None or "" for DEFAULT_RULES; a string "embed=fsdp;batch=data+fsdp;mlp=" or a
      sequence of (logical name, mesh axis | tuple of axes | None) pairs. Either form
      overrides only the names it mentions, the rest keep their DEFAULT_RULES entry.
  Returns:
    A tuple of (logical name, mesh axes) pairs.
  """
  if not rules:
    return DEFAULT_RULES
  if isinstance(rules, str):
    pairs = []
    for item in filter(None, (r.strip() for r in rules.split(";"))):
      name, eq, axes = item.partition("=")
      if not eq:
        raise ConfigError(f"rules: {item!r} is not of the form logical=axis+axis")
      parts = tuple(a.strip() for a in axes.split("+") if a.strip())
      pairs.append((name.strip(), parts[0] if len(parts) == 1 else parts or None))
  else:
    pairs = [tuple(r) for r in rules]
  table = dict(DEFAULT_RULES)
  for pair in pairs:
    if len(pair) != 2 or pair[0] not in table:
      raise ConfigError(f"rules: {pair!r}: expected (name, mesh axes) with a name among "
                        f"{', '.join(table)}")
    name, target = pair
    if isinstance(target, list):
      target = tuple(target)
    axes = () if target is None else (target,) if isinstance(target, str) else target
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"rules: {name} -> {bad}: mesh axes are {', '.join(MESH_AXES)}")
    table[name] = target
  return tuple(table.items())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [B,T] batch field: rows split over the `batch` rule's mesh axes."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))


# Params `describe` shows by default: path suffixes, the first match of each is printed.
DESCRIBE = ("embedding", "attn/q/w", "attn/k/w", "attn/o/w", "mlp/gate/w", "mlp/down/w",
            "attn_norm/scale", "lm_head")


def describe(shardings, paths: Sequence[str] = DESCRIBE, log=print) -> dict[str, P]:
  """Prints the PartitionSpec of a few params, so a run's log shows the layout.

  Args:
    shardings: the state's (or the params') pytree of NamedSharding.
    paths: param path suffixes; the first param ending with each is shown.
  Returns:
    {param path: PartitionSpec} of what was printed.
  """
  flat = tree_paths(shardings.get("params", shardings))
  out = {}
  for suffix in paths:
    hit = next((k for k in flat if k == suffix or k.endswith("/" + suffix)), None)
    if hit is not None:
      out[hit] = flat[hit].spec
  width = max((len(k) for k in out), default=0)
  for k, spec in out.items():
    log(f"  {k:<{width}}  {spec}")
  return out


def assert_params_sharded(params, mesh: Mesh, min_size: int = 1 << 16) -> dict[str, float]:
  """Refuses big params that are replicated over the model-parallel axes (fsdp, tensor).

  The check MaxText runs before training, per param: a bad rule or a dim the mesh does not
  divide otherwise shows up only as an out-of-memory error on the pod.

  Args:
    params: pytree of arrays or ShapeDtypeStructs with `.sharding` (NamedSharding).
    mesh: the training mesh; copies over `data` are expected and allowed.
    min_size: params with fewer elements (norm scales) may replicate.
  Returns:
    {"total": elements, "per_device": elements on one device, "ideal": total / fsdp*tensor}.
  Raises:
    ConfigError naming the offending params.
  """
  model_par = mesh.shape["fsdp"] * mesh.shape["tensor"]
  total = per_device = 0
  bad = []
  for path, x in tree_paths(params).items():
    size = math.prod(x.shape)
    shard = math.prod(x.sharding.shard_shape(x.shape))
    total += size
    per_device += shard
    if size >= min_size and size // shard < model_par:
      bad.append(f"{path} {tuple(x.shape)} {x.sharding.spec} ({size // shard}-way)")
  if bad:
    raise ConfigError(f"params not sharded {model_par}-way over fsdp*tensor (mesh "
                      f"{dict(mesh.shape)}): " + "; ".join(bad))
  return {"total": total, "per_device": per_device, "ideal": total / model_par}


def tree_paths(tree) -> dict[str, Any]:
  """{"a/b/c": leaf} for a tree of nested dicts (the param paths a run's log shows)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
          for path, leaf in flat}


def shard_map(f, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.6, check_vma) or the experimental one on older releases.
  The checks are off: Pallas calls and custom VJPs carry no varying-axes info."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as sm
  return sm(f, mesh, in_specs, out_specs, check_rep=False)
