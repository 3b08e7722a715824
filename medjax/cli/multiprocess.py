"""The multi-process flags of `train`, `eval` and `generate`, and running one process of a
job under the supervisor (`parallel.supervisor`), which turns the distributed runtime's
fatal errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys

HELP = ("Cloud TPU VMs (and clusters jax detects, e.g. SLURM) need none of these: jax finds "
        "the other hosts itself. Elsewhere give the first three on every host. A process "
        "that dies makes the others stop within about --heartbeat-timeout seconds (at once "
        "if it is process 0); rerunning all of them resumes from the last checkpoint.")


def add_args(p) -> None:
  from medjax.inputs import Int, Text, host_port
  from medjax.parallel.cluster import HEARTBEAT_TIMEOUT, INIT_TIMEOUT
  g = p.add_argument_group("multi-process", HELP)
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 type=Text(check=host_port, what="HOST:PORT"),
                 help="address of process 0 (it listens on that port)")
  g.add_argument("--num-processes", type=Int(ge=1), default=None, metavar="N")
  g.add_argument("--process-id", type=Int(ge=0), default=None, metavar="I", help="0 .. N-1")
  g.add_argument("--init-timeout", type=Int(ge=1), default=INIT_TIMEOUT, metavar="S",
                 help=f"seconds to wait for all processes to join (default {INIT_TIMEOUT})")
  g.add_argument("--heartbeat-timeout", type=Int(ge=1), default=HEARTBEAT_TIMEOUT, metavar="S",
                 help="seconds after which a silent process counts as dead and the others "
                      f"stop (default {HEARTBEAT_TIMEOUT})")


def supervise(args, command: str) -> int | None:
  """Runs this command line again as a supervised worker when this is one process of
  several; returns its exit status. None: go on in this process (a lone process, or the
  worker itself)."""
  from medjax.parallel import cluster, supervisor
  cluster.check_args(args.coordinator, args.num_processes, args.process_id)
  several = (args.num_processes or 0) > 1 or (args.coordinator is None and
                                               cluster.wants_cluster())
  if not several or supervisor.is_worker():
    return None
  facts = {"coordinator": args.coordinator, "num_processes": args.num_processes,
           "init_timeout": args.init_timeout, "heartbeat_timeout": args.heartbeat_timeout}
  return supervisor.run(list(sys.orig_argv), command, facts)


def join(args) -> bool:
  """Joins the job (`distributed.initialize`); False for a lone process."""
  from medjax.parallel import distributed
  return distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                args.init_timeout, args.heartbeat_timeout)


# What a failed collective says when a peer process died (gloo on CPU, the coordination
# service everywhere).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "heartbeat timeout",
              "CoordinationServiceError", "Barrier failed", "Gloo")


@contextlib.contextmanager
def peers_lost(command: str):
  """Around a job's work: when a collective fails because another process died, say so in
  one line and leave at once (jax's orderly shutdown would wait for the dead process)."""
  try:
    yield
  except Exception as e:  # jax's runtime error type has moved between releases
    import jax
    text = str(e)
    if jax.process_count() == 1 or not any(k in text for k in _PEER_GONE):
      raise
    first = " ".join(text.split("\n", 1)[0].split())[:200]
    print(f"medjax {command}: error: another process of the job stopped ({first}); stopping "
          "this one too. Rerun every process to resume from the last checkpoint",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
