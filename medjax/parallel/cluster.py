"""Describing a multi-process job without starting jax: the flags' checks, the runtime's
time bounds, and whether jax's own cluster detection applies. Light enough for the CLI's
supervising parent process (`parallel.supervisor`), which never imports jax."""

from __future__ import annotations

import os

from medjax.errors import ConfigError

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
  if given == (None, None, None) or (num_processes == 1 and process_id in (None, 0)):
    return  # jax's own detection, or a lone process
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
