"""Multi-process (multi-host) setup and global batches.

On a pod every host runs the same program; `initialize` joins them, `process_slice` says
which rows of the global batch this host loads, and `global_batch` turns the host's rows
into one global `jax.Array` sharded over the mesh.
"""

from __future__ import annotations

import inspect
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from medjax.errors import ConfigError
from medjax.parallel import sharding as sharding_lib

# Set on Cloud TPU VMs (by the VM image / GKE); jax's own cluster detection reads them too.
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "TPU_NAME")


def _on_cloud_tpu() -> bool:
  return any(os.environ.get(k) for k in _TPU_ENV) or os.path.exists("/dev/accel0") or (
      os.path.isdir("/dev/vfio") and len(os.listdir("/dev/vfio")) > 1)


# Defaults of the distributed runtime's bounds (seconds), jax's own: how long a process waits
# for all of them to join, and how long a silent peer counts as alive. A peer that dies makes
# the others exit within about `heartbeat_timeout`; a dead process 0 (the coordinator), at once.
INIT_TIMEOUT = 300
HEARTBEAT_TIMEOUT = 100


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


def wants_cluster() -> bool:
  """True where jax's cluster detection finds several processes without flags: a Cloud TPU
  VM, a SLURM job of several tasks, or JAX_COORDINATOR_ADDRESS set."""
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
  return _on_cloud_tpu() or slurm or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def check_args(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """ConfigError, naming the flag and value, unless the three describe a cluster (or are all
  None, for jax's own detection)."""
  given = (coordinator_address, num_processes, process_id)
  if given == (None, None, None):
    return
  if None in given:
    raise ConfigError("--coordinator, --num-processes and --process-id go together "
                      f"(got {coordinator_address}, {num_processes}, {process_id})")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator {coordinator_address!r}: expected HOST:PORT")
  if num_processes < 1:
    raise ConfigError(f"--num-processes {num_processes}: must be >= 1")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id {process_id}: must be in [0, {num_processes}) for "
                      f"--num-processes {num_processes}")


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
