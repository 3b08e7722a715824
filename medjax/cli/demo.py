"""`medjax demo`: the paper's pipeline in miniature (`medjax.demo.pipeline`)."""

from __future__ import annotations

from medjax.cli.args import path
from medjax.inputs import DIR, FILE, FILE_OR_DIR, WORKDIR


def add_args(p):
  path(p, "--workdir", kind=WORKDIR, default="medjax-demo",
       help="where all artifacts go (default ./medjax-demo); finished steps are reused")
  p.add_argument("--quick", action="store_true",
                 help="smaller settings (about 2 minutes on a 2-core CPU)")
  path(p, "--base", kind=DIR, default=None,
       help="Hugging Face Llama 2/3.x or Qwen2/2.5 dir to start from (default: shipped "
       "TinyStories-260K); a tokenizer.json base skips vocabulary extension")
  path(p, "--corpus", kind=FILE_OR_DIR, nargs="+", default=None, metavar="FILE",
       help="medical text files/folders (.csv/.txt/.jsonl; default: shipped sample)")
  path(p, "--cmexam", kind=FILE, default=None, metavar="FILE",
       help="CMExam CSV (default: the shipped 1,200-question sample)")
  p.add_argument("--redo", action="store_true", help="rerun every step, ignoring finished ones")


def run(args):
  from medjax.demo.pipeline import run_demo
  run_demo(args.workdir, quick=args.quick, base=args.base, corpus_paths=args.corpus,
           cmexam_path=args.cmexam, redo=args.redo)
  return 0
