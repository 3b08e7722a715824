"""`medjax report WORKDIR [WORKDIR ...]`: a report of training runs (`training.report`).

  medjax report runs/cpt runs/sft --out reports/recipe   # CPT then SFT, compared
"""

from __future__ import annotations

import os

from medjax.cli.args import path
from medjax.inputs import DIR, WORKDIR, Text


def add_args(p):
  path(p, "workdirs", kind=DIR, nargs="+", metavar="WORKDIR", help="training workdirs; a run "
       "whose init_from is another one given is drawn after it (CPT then SFT)")
  path(p, "--out", kind=WORKDIR, help="folder for report.md, report.html and the PNG figures "
       "(default: WORKDIR/report of the first run)")
  p.add_argument("--label", action="append", default=[], type=Text(nonempty=True),
                 help="a name per run, in order (default: the folder names)")
  p.add_argument("--title", default="medjax run report", type=Text())


def run(args):
  from medjax.training import report
  runs = report.read_runs(args.workdirs, args.label)  # every run is read before anything is written
  out = report.build(runs, args.out or os.path.join(args.workdirs[0], "report"), args.title)
  for kind in ("markdown", "html", "loss", "throughput", "evals"):
    if kind in out:
      print(f"{kind:<10} {out[kind]}")
  return 0
