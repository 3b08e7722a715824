"""Declared command-line arguments, shared by every command.

Numbers and choices are checked by argparse as they are parsed (`type=inputs.Int(ge=1)`,
`choices=`); paths are declared with `path(...)` and checked by `check_paths` after parsing,
before the command runs (inputs exist with the right kind, outputs can be written, a
non-empty output folder needs --overwrite, and no output folder replaced with --overwrite
holds one of the command's inputs). Every error is one line naming the flag and the value.
"""

from __future__ import annotations

import argparse

from medjax import inputs
from medjax.errors import UsageError

_KEY = "_path:"  # namespace attributes holding (flag, spec) per declared path argument


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are UsageErrors (one line, exit 1), not exit 2."""

  def error(self, message):
    raise UsageError(" ".join(message.split()))


def flag_name(action: argparse.Action) -> str:
  """'--out' for an option (its longest spelling), 'OUT_DIR' for a positional."""
  if action.option_strings:
    return max(action.option_strings, key=len)
  return action.metavar or action.dest.upper()


def path(p: argparse.ArgumentParser, *names: str, kind: str, suffix: str = "",
         with_arg: bool = False, **kw) -> argparse.Action:
  """`p.add_argument(*names, **kw)` for a path of `kind` (a medjax.inputs constant).

  Args:
    p: the (sub)command's parser.
    names: the flag spellings, or one positional name.
    kind: inputs.FILE, DIR, FILE_OR_DIR (inputs); NEW_DIR, WORKDIR, NEW_FILE (outputs).
      A NEW_DIR adds `--overwrite` to `p` unless it has one.
    suffix: the name must end with it (e.g. ".jsonl").
    with_arg: the value is PATH[:ARG] (a config file and its argument).
    kw: add_argument's other arguments (help, default, nargs, required, metavar).
  Returns:
    The argparse action.
  """
  a = p.add_argument(*names, **kw)
  spec = inputs.Path(kind=kind, suffix=suffix, optional=True)
  p.set_defaults(**{_KEY + a.dest: (flag_name(a), spec, with_arg)})
  if kind == inputs.NEW_DIR and not getattr(p, "_medjax_overwrite", False):
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output folder")
    p._medjax_overwrite = True
  return a


def declared_paths(args: argparse.Namespace) -> list[tuple[str, str, inputs.Path]]:
  """(flag, value, spec) of every declared path argument that was given (or defaulted)."""
  out = []
  for key, decl in vars(args).items():
    if not key.startswith(_KEY):
      continue
    flag, spec, with_arg = decl
    value = getattr(args, key[len(_KEY):], None)
    for v in value if isinstance(value, list) else [value]:
      if v is not None:
        out.append((flag, v.split(":", 1)[0] if with_arg else v, spec))
  return out


def check_paths(args: argparse.Namespace) -> None:
  """UsageError for the first declared path argument that cannot serve (see module doc)."""
  overwrite = bool(getattr(args, "overwrite", False))
  found = declared_paths(args)
  for flag, value, spec in found:
    problem = spec.problem(value, overwrite)
    if problem:
      raise UsageError(f"argument {flag}: {inputs.shown(value)}: {problem}")
  if overwrite:  # --overwrite replaces the folder: it must not hold what is being read
    for flag, value, spec in found:
      if spec.kind != inputs.NEW_DIR:
        continue
      for f2, v2, s2 in found:
        if s2.kind in inputs.INPUTS and not v2.startswith(inputs.ASSET_PREFIX) \
            and inputs.inside(v2, value):
          raise UsageError(f"argument {flag}: {inputs.shown(value)}: --overwrite would "
                           f"delete {f2} {inputs.shown(v2)}, which is inside it")
