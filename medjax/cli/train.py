"""`medjax train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]`."""

from __future__ import annotations

from medjax.cli.args import path
from medjax.errors import UsageError
from medjax.inputs import FILE, WORKDIR, Int, Text, host_port


def add_args(p):
  path(p, "--config", kind=FILE, with_arg=True, required=True,
       help="config file with get_config(), e.g. configs/tiny_cpt.py[:arg]")
  path(p, "--workdir", kind=WORKDIR, required=True,
       help="run directory (a local path; on TPU VMs the gcsfuse-mounted bucket, "
            "/gcs/BUCKET/...)")
  g = p.add_argument_group(
      "multi-process", "Cloud TPU VMs (and clusters jax detects, e.g. SLURM) need none of "
      "these: jax finds the other hosts itself. Elsewhere give all three on every host.")
  g.add_argument("--coordinator", default=None, type=Text(check=host_port, what="HOST:PORT"),
                 help="host:port of process 0")
  g.add_argument("--num-processes", type=Int(ge=1), default=None)
  g.add_argument("--process-id", type=Int(ge=0), default=None)
  p.epilog = ("Override any config field with --config.FIELD=VALUE, e.g. "
              "--config.total_steps=100 --config.optim.lr=1e-4 (every field, its default and "
              "what it accepts: medjax/training/config.py)")
  p.set_defaults(_accepts_rest=True)


def run(args):
  from medjax.parallel import distributed
  from medjax.training import config as runconfig
  from medjax.training import loop
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if explicit != (None, None, None):
    if None in explicit:
      raise UsageError("--coordinator, --num-processes and --process-id go together")
    if args.process_id >= args.num_processes:
      raise UsageError(f"argument --process-id: {args.process_id}: must be below "
                       f"--num-processes {args.num_processes}")
  c = runconfig.load(args.config, args.rest)
  runconfig.validate(c)  # every field, before any process joins or anything is built
  if explicit != (None, None, None):
    distributed.initialize(*explicit)
  loop.main(c, args.workdir)
