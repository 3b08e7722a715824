"""`medjax train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]`."""

from __future__ import annotations

from medjax.cli import multiprocess
from medjax.cli.args import path
from medjax.inputs import FILE, WORKDIR


def add_args(p):
  path(p, "--config", kind=FILE, with_arg=True, required=True,
       help="config file with get_config(), e.g. configs/tiny_cpt.py[:arg]")
  path(p, "--workdir", kind=WORKDIR, required=True,
       help="run directory (a local path; on TPU VMs the gcsfuse-mounted bucket, "
            "/gcs/BUCKET/...)")
  multiprocess.add_args(p)
  p.epilog = ("Override any config field with --config.FIELD=VALUE, e.g. "
              "--config.total_steps=100 --config.optim.lr=1e-4 (every field, its default and "
              "what it accepts: medjax/training/config.py). Every process of a multi-process "
              "run checks at start that all were given the same config.")
  p.set_defaults(_accepts_rest=True)


def run(args):
  rc = multiprocess.supervise(args, "train")
  if rc is not None:
    return rc
  from medjax.training import config as runconfig
  from medjax.training import loop
  c = runconfig.load(args.config, args.rest)
  runconfig.validate(c)  # every field, before any process joins or anything is built
  multiprocess.join(args)
  with multiprocess.peers_lost("train"):
    loop.main(c, args.workdir)
