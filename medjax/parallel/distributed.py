"""Multi-process (multi-host) setup and global batches.

On a pod every host runs the same program; `initialize` joins them, `process_slice` says
which rows of the global batch this host loads, and `global_batch` turns the host's rows
into one global `jax.Array` sharded over the mesh.
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from medjax.errors import ConfigError
from medjax.parallel.cluster import (HEARTBEAT_TIMEOUT, INIT_TIMEOUT, check_args,
                                    wants_cluster)
from medjax.parallel import sharding as sharding_lib


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, init_timeout: int = INIT_TIMEOUT,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> bool:
  """Joins this process to the others; call before anything touches a device.

  Args:
    coordinator_address: "host:port" of process 0. None with the other two None: on a
      Cloud TPU VM (or with JAX_COORDINATOR_ADDRESS set) jax discovers everything itself;
      elsewhere this is one process and nothing happens.
    num_processes, process_id: this process's place, for explicit (non-TPU) clusters.
    init_timeout: seconds to wait for every process to join (then the runtime stops this
      process; `parallel.supervisor` turns that into one line).
    heartbeat_timeout: seconds after which a silent process counts as dead, and the
      others stop.
  Returns:
    True if jax.distributed was initialized (now or before), False for a lone process.
  Raises:
    ConfigError for arguments that cannot describe a cluster.
  """
  global _initialized
  if _initialized or _jax_says_initialized():
    return True
  check_args(coordinator_address, num_processes, process_id)
  bounds = _timeouts(init_timeout, heartbeat_timeout)
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if not explicit:
    if not wants_cluster():
      return False
    jax.distributed.initialize(**bounds)
    _initialized = True
    return True
  if num_processes == 1:
    return False
  # CPU processes need a collectives backend to all-reduce across processes (tests, CPU
  # clusters); it is ignored by TPU/GPU. gloo is the default in recent jax, older had none.
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    pass
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **bounds)
  _initialized = True
  return True


def _timeouts(init_timeout: int, heartbeat_timeout: int) -> dict:
  """The bounds as `jax.distributed.initialize` arguments this jax release accepts."""
  for name, v in (("--init-timeout", init_timeout), ("--heartbeat-timeout", heartbeat_timeout)):
    if int(v) < 1:
      raise ConfigError(f"{name} {v}: must be >= 1 second")
  params = inspect.signature(jax.distributed.initialize).parameters
  out = {"initialization_timeout": int(init_timeout),
         "heartbeat_timeout_seconds": int(heartbeat_timeout)}
  return {k: v for k, v in out.items() if k in params}


_initialized = False  # set by `initialize`; covers jax releases without is_initialized()


def _jax_says_initialized() -> bool:
  """jax.distributed.is_initialized() where this jax has it (someone else may have joined)."""
  fn = getattr(jax.distributed, "is_initialized", None)
  return bool(fn()) if fn is not None else False


def process_slice(global_batch_size: int, batch_sharding: NamedSharding | None = None) -> slice:
  """The rows of the global batch that this process loads.

  Args:
    global_batch_size: rows in the global batch.
    batch_sharding: the batch's sharding; rows are then those this process's devices hold
      (all rows when the batch axes do not span processes). None: an even split by
      process index.
  Returns:
    A contiguous slice of rows.
  """
  if batch_sharding is None:
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
      raise ValueError(f"global batch {global_batch_size} does not split over {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)
  idx = batch_sharding.addressable_devices_indices_map((global_batch_size,))
  rows = [s[0].indices(global_batch_size)[:2] for s in idx.values()]
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  covered = set().union(*(range(a, b) for a, b in rows))
  if len(covered) != stop - start:  # would need a device order that interleaves hosts
    raise ValueError(f"this process's batch rows are not contiguous: {sorted(rows)}")
  return slice(start, stop)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 batch_sharding: NamedSharding | None = None) -> dict[str, jax.Array]:
  """One global array per field from each process's rows (`process_slice`).

  Args:
    local_batch: {field: [b,T] host array}, the rows `process_slice` named.
    mesh: the training mesh.
    batch_sharding: defaults to `sharding.batch_sharding(mesh)`.
  Returns:
    {field: [B,T] jax.Array} sharded as batch_sharding, B the global batch size.
  """
  batch_sharding = batch_sharding or sharding_lib.batch_sharding(mesh)
  out = {}
  for k, v in local_batch.items():
    rows = _global_rows(v.shape[0], batch_sharding)
    out[k] = jax.make_array_from_process_local_data(batch_sharding, v, (rows, *v.shape[1:]))
  return out


def _global_rows(local_rows: int, batch_sharding: NamedSharding) -> int:
  """Global batch size implied by this process holding `local_rows` rows."""
  # This process holds a fixed fraction of the rows, whatever the batch size: measure it.
  probe = batch_sharding.mesh.size * local_rows
  sl = process_slice(probe, batch_sharding)
  return probe * local_rows // (sl.stop - sl.start)
