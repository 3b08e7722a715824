"""`medjax train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]`."""

from __future__ import annotations

from medjax.errors import ConfigError


def add_args(p):
  p.add_argument("--config", required=True,
                 help="config file with get_config(), e.g. configs/tiny_cpt.py[:arg]")
  p.add_argument("--workdir", required=True,
                 help="run directory (a local path; on TPU VMs the gcsfuse-mounted bucket, "
                      "/gcs/BUCKET/...)")
  g = p.add_argument_group(
      "multi-process", "Cloud TPU VMs (and clusters jax detects, e.g. SLURM) need none of "
      "these: jax finds the other hosts itself. Elsewhere give all three on every host.")
  g.add_argument("--coordinator", default=None, help="host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  p.epilog = ("Override any config field with --config.FIELD=VALUE, e.g. "
              "--config.total_steps=100 --config.optim.lr=1e-4")
  p.set_defaults(_accepts_rest=True)


def run(args):
  from medjax.parallel import distributed
  from medjax.training import config as runconfig
  from medjax.training import loop
  c = runconfig.load(args.config, args.rest)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if explicit != (None, None, None):
    if None in explicit:
      raise ConfigError("--coordinator, --num-processes and --process-id go together")
    distributed.initialize(*explicit)
  loop.main(c, args.workdir)
