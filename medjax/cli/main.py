"""The `medjax` command. Each subcommand has a module in `medjax.cli`.

A module named in COMMANDS defines `add_args(parser)` and `run(args) -> int | None`; it is
imported only when its subcommand runs, so `medjax --help` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medjax.cli.args import Parser, check_paths
from medjax.errors import MedjaxError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("medjax.cli.train", "continued pretraining or SFT from a config file"),
    "import-hf": ("medjax.cli.convert", "convert a Hugging Face Llama/Qwen2 checkpoint to medjax"),
    "export-hf": ("medjax.cli.convert:export", "export a medjax checkpoint to Hugging Face format"),
    "fit": ("medjax.cli.fit", "compile the train step for a TPU topology; report HBM use and FLOPs"),
    "plan": ("medjax.cli.plan", "price a recipe before launch: fits, step time, hours and cost"),
    "report": ("medjax.cli.report", "report of training runs: curves, evals, throughput (MD+HTML)"),
    "generate": ("medjax.cli.eval:generate", "generate text from a checkpoint"),
    "eval": ("medjax.cli.eval", "CMExam accuracy or text perplexity of a checkpoint"),
    "data": ("medjax.cli.data", "build, inspect and check datasets (build/show/overlap/bench)"),
    "tokenizer": ("medjax.cli.data:tokenizer", "extend a tokenizer with domain pieces"),
    "bench": ("medjax.cli.bench", "benchmarks side by side with Hugging Face (train/generate/...)"),
    "demo": ("medjax.cli.demo", "the whole pipeline in miniature on the shipped samples (CPU)"),
}


def _load(spec: str):
  mod, _, prefix = spec.partition(":")
  m = importlib.import_module(mod)
  pre = f"{prefix}_" if prefix else ""
  return getattr(m, f"{pre}add_args"), getattr(m, f"{pre}run")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; only `command`'s module is imported (so one broken module or a heavy
  import never slows or breaks the others)."""
  p = Parser(
      prog="medjax", description="Adapt Llama 2 to the medical domain with JAX: "
      "continued pretraining, SFT and CMExam evaluation.")
  p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
  sub = p.add_subparsers(dest="command", metavar="COMMAND")
  for name, (spec, help_) in COMMANDS.items():
    sp = sub.add_parser(name, help=help_, description=help_)
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show full tracebacks on errors")
    if name == command:
      add_args, _ = _load(spec)
      add_args(sp)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  command = next((a for a in argv if not a.startswith("-")), None)
  command = command if command in COMMANDS else None
  debug = "--debug" in argv
  try:
    parser = build_parser(command)
    # `medjax train` takes absl-style --config.x=... overrides; pass unknown flags through.
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
      parser.print_help()
      return 2
    if rest and not getattr(args, "_accepts_rest", False):
      parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    check_paths(args)  # every declared path, before the command does anything
    _, run = _load(COMMANDS[args.command][0])
    return int(run(args) or 0)
  except MedjaxError as e:
    if debug:
      raise
    msg = " ".join(str(e).splitlines())  # one line, whatever a file name holds
    print(f"medjax{' ' + command if command else ''}: error: {msg}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
