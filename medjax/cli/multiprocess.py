"""The multi-process flags of `train`, `eval` and `generate`, and running one process of a
job under the supervisor (`parallel.supervisor`), which turns the distributed runtime's
fatal errors into one line."""

from __future__ import annotations

import sys

HELP = ("Cloud TPU VMs (and clusters jax detects, e.g. SLURM) need none of these: jax finds "
        "the other hosts itself. Elsewhere give the first three on every host. A process "
        "that dies makes the others stop within about --heartbeat-timeout seconds (at once "
        "if it is process 0); rerunning all of them resumes from the last checkpoint.")


def add_args(p) -> None:
  from medjax.parallel.distributed import HEARTBEAT_TIMEOUT, INIT_TIMEOUT
  g = p.add_argument_group("multi-process", HELP)
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0 (it listens on that port)")
  g.add_argument("--num-processes", type=int, default=None, metavar="N")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
  g.add_argument("--init-timeout", type=int, default=INIT_TIMEOUT, metavar="S",
                 help=f"seconds to wait for all processes to join (default {INIT_TIMEOUT})")
  g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT, metavar="S",
                 help="seconds after which a silent process counts as dead and the others "
                      f"stop (default {HEARTBEAT_TIMEOUT})")


def supervise(args, command: str) -> int | None:
  """Runs this command line again as a supervised worker when this is one process of
  several; returns its exit status. None: go on in this process (a lone process, or the
  worker itself)."""
  from medjax.parallel import distributed, supervisor
  distributed.check_args(args.coordinator, args.num_processes, args.process_id)
  several = (args.num_processes or 0) > 1 or (args.coordinator is None and
                                               distributed.wants_cluster())
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
