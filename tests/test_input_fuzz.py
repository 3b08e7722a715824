"""Fuzzed input: every flag of every command and every run-config field, given wrong types,
out-of-range numbers, empty strings and odd paths, fails with exit 1, one line naming the
flag or field, no traceback, and nothing written.

What each flag and field accepts is read from its declaration (`medjax.inputs` specs in the
parsers and in `training.config.fields()`); hypothesis draws values outside it. Commands
run in-process and stop before doing any work: each command's `run` (for `train`, the
training loop) is replaced by a tripwire, so a bad value that got through fails the test
as "reached the command" instead of starting a compile.

MEDJAX_FUZZ_EXAMPLES=200 runs a longer, randomized campaign (default: a few derandomized
examples per flag and field, a few seconds in all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medjax import inputs
from medjax.cli import args as cli_args
from medjax.training import config as runconfig

cli_main = importlib.import_module("medjax.cli.main")  # (medjax.cli.main is also a function)

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpt.py")
EXAMPLES = int(os.environ.get("MEDJAX_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 5, derandomize=not EXAMPLES, deadline=None,
                database=None, suppress_health_check=list(HealthCheck))


class ReachedCommand(Exception):
  """A bad value got past every check; the command would have run."""


def _tripwire(*a, **k):
  raise ReachedCommand


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Inputs every baseline command accepts, and paths of every kind for the fuzzer."""
  r = tmp_path_factory.mktemp("fuzz")
  (r / "file.txt").write_text("fever and cough\n")
  (r / "dir").mkdir()
  (r / "nonempty").mkdir()
  (r / "nonempty" / "keep.txt").write_text("mine")
  (r / "cwd").mkdir()  # the commands' working directory (relative paths, defaults)
  return r


@pytest.fixture(autouse=True)
def _no_work(monkeypatch, root):
  """Every command stops where it would start working; the cwd is root/cwd."""
  real = cli_main._load

  def load(spec):
    add_args, run = real(spec)
    return add_args, (run if spec == "medjax.cli.train" else _tripwire)

  monkeypatch.setattr(cli_main, "_load", load)
  monkeypatch.setattr("medjax.training.loop.main", _tripwire)
  monkeypatch.chdir(root / "cwd")


# ------------------------------------------------------------------ the commands' arguments


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...]):
  """(words, parser) of each runnable (sub)command below `parser`."""
  subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  if not subs:
    yield words, parser
    return
  for name, p in subs[0].choices.items():
    yield from _leaves(p, words + (name,))


def _commands():
  out = []
  for cmd in cli_main.COMMANDS:
    top = cli_main.build_parser(cmd)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out.extend(_leaves(sub.choices[cmd], (cmd,)))
  return out


COMMANDS = _commands()
SKIP = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
        argparse._SubParsersAction)


def _declaration(parser, action):
  """What a value-taking argument accepts: an inputs.Spec, a Path, or a tuple of choices;
  None when undeclared."""
  path = parser.get_default(cli_args._KEY + action.dest)
  if path is not None:
    return path[1]
  if isinstance(action.type, inputs.Spec):
    if isinstance(action.type, inputs.Text) and action.type.check is None \
        and not action.type.nonempty:
      return "free text"
    return action.type
  if action.choices is not None:
    return tuple(action.choices)
  return None


def _arguments():
  """(command words, parser, action, declaration) of every value-taking argument."""
  out = []
  for words, parser in COMMANDS:
    for a in parser._actions:
      if isinstance(a, SKIP) or a.dest in ("debug",):
        continue
      out.append((words, parser, a, _declaration(parser, a)))
  return out


ARGUMENTS = _arguments()
FUZZED = [x for x in ARGUMENTS if x[3] not in (None, "free text")]  # --prompt, --note: any text


def test_every_argument_declares_what_it_accepts():
  """A new flag needs a spec (`type=inputs.Int(ge=1)`...), `choices=`, or `args.path`."""
  undeclared = [f"{' '.join(w)} {cli_args.flag_name(a)}" for w, _, a, d in ARGUMENTS if d is None]
  assert not undeclared, undeclared
  kinds = {}
  for *_, d in ARGUMENTS:
    k = ("free text" if d == "free text" else "path" if isinstance(d, inputs.Path)
         else "choice" if isinstance(d, (tuple, inputs.Choice)) else "number/format")
    kinds[k] = kinds.get(k, 0) + 1
  print(f"{len(ARGUMENTS)} arguments in {len(COMMANDS)} commands: {kinds}; "
        f"{len(runconfig.FIELDS)} config fields, {len(FUZZED_FIELDS)} fuzzed")
  assert len(FUZZED) >= 120 and len(FUZZED_FIELDS) >= 43


def _baseline(root: Path, words: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
  """(positionals, {flag: values}) a command accepts: it reaches its tripwire."""
  f, d, out = str(root / "file.txt"), str(root / "dir"), str(root / "out")
  table = {
      ("train",): ([], {"--config": [CONFIG], "--workdir": [str(root / "w")]}),
      ("import-hf",): ([d, out], {}),
      ("export-hf",): ([d, out], {}),
      ("fit",): ([], {"--topology": ["v5p:2x2x1"]}),
      ("plan",): ([], {"--config": [CONFIG], "--topology": ["v5p:2x2x1"]}),
      ("report",): ([d], {}),
      ("generate",): ([], {"--checkpoint": [d], "--prompt": ["x"]}),
      ("eval",): ([], {"--checkpoint": [d], "--text": [f]}),
      ("data", "build"): (["cmexam"], {"--input": [f], "--out": [out]}),
      ("data", "show"): ([], {"--kind": ["cpt"]}),
      ("data", "overlap"): ([], {"--corpus": [f], "--eval": [f]}),
      ("tokenizer", "extend"): ([], {"--corpus": [f], "--add": ["10"], "--out": [out]}),
      ("tokenizer", "resize"): ([], {"--checkpoint": [d], "--tokenizer": [f], "--out": [out]}),
  }
  pos, opts = table.get(words, ([], {}))
  return list(pos), dict(opts)


def _argv(words, positionals, opts) -> list[str]:
  argv = [*words, *positionals]
  for flag, values in opts.items():
    argv += [flag, *values]
  return argv


def _run(argv: list[str]) -> tuple[int, str]:
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = cli_main.main(argv)
  return rc, err.getvalue()


def _snapshot(root: Path) -> set:
  return {(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_baselines_reach_the_command(root, words):
  """The fuzzer's starting points are valid: only the fuzzed value makes a run fail. (A new
  command with required arguments adds valid ones to `_baseline`.)"""
  argv = _argv(words, *_baseline(root, words))
  try:
    rc, err = _run(argv)
  except ReachedCommand:
    return
  pytest.fail(f"baseline `medjax {' '.join(argv)}` was refused (rc {rc}): {err.strip()}")


# ------------------------------------------------------------------ bad values, by declaration

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_NOT_NUMBERS = st.sampled_from(["", " ", "abc", "1.5.2", "0x10", "1e", "--", "one", "1,2"])
_BAD_FORMATS = {  # Text specs with a check: values the check must refuse
    "HOST:PORT": ["x", "host:", ":1234", "h:0", "h:65536", "h:port", "h:-1"],
    "CHIP:AxB[xC]": ["", "v5p", "v5p:", "v5p:2", "v9:2x2", "v5p:0x2", "v5p:2x2x2x2", "tpu"],
    "sharding rules": ["x", "embed", "nope=fsdp", "embed=nope", "=fsdp", "embed=fsdp;x"],
    "names among": ["", "x", "q,x", "Q", "qkv", ",", "q,k,v,o,zz"],
    "CHIP=USD": ["", "v5p", "v5p=", "=1", "v5p=x", "v5p=0", "v5p=-1", "v5p=inf"],
    "a token count or '-'": ["", "x", "0", "-1", "--", "1e", "nan", "inf"],
    "a number of passes or '-'": ["", "x", "0", "-2", "nan", "inf"],
    "a task name": ["", "nope", "cmexam2", "cmmlu:", "/nonexistent/task.json"],
    "shapes among": ["", "x", "70b-1,x", ",", "70B-1"],
    "a build folder": ["", "tfds:", "tfds:/nonexistent/build", "/nonexistent", "gs://b/built"],
}


def _int_text(s: str):
  try:
    return int(s)
  except ValueError:
    return None


def _float_text(s: str):
  try:
    return float(s)
  except ValueError:
    return None


def _outside(spec: inputs.Spec, v) -> bool:
  return spec.problem(v) is not None


def _numbers(spec) -> st.SearchStrategy[str]:
  """Numbers outside the declared range, and text that is not a number of that type."""
  is_int = isinstance(spec, inputs.Int)
  parse = _int_text if is_int else _float_text
  out = [_NOT_NUMBERS.filter(lambda s: parse(s) is None),
         _TEXT.filter(lambda s: parse(s) is None)]
  lo = spec.ge if spec.ge is not None else spec.gt
  hi = spec.le if spec.le is not None else spec.lt
  if is_int:
    if lo is not None:
      out.append(st.integers(max_value=int(lo)).filter(lambda v: _outside(spec, v)).map(str))
    if hi is not None:
      out.append(st.integers(min_value=int(hi)).filter(lambda v: _outside(spec, v)).map(str))
    out.append(st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.3f}"))
  else:
    out.append(st.sampled_from(["nan", "inf", "-inf"]))
    if lo is not None:
      out.append(st.floats(max_value=float(lo)).filter(lambda v: _outside(spec, v)).map(repr))
    if hi is not None:
      out.append(st.floats(min_value=float(hi)).filter(lambda v: _outside(spec, v)).map(repr))
  return st.one_of(out)


def _paths(spec: inputs.Path, root: Path) -> st.SearchStrategy[str]:
  """Paths of the wrong kind, missing inputs, unwritable outputs, empty or odd names."""
  f, d, full = str(root / "file.txt"), str(root / "dir"), str(root / "nonempty")
  odd = ["gs://bucket/x", "http://host/x", str(root / ("a" * 300)), f + "/below",
         str(root / "dir") + "\x00x", "asset:nope"]
  if not spec.empty_ok:
    odd.append("")
  if spec.kind == inputs.FILE:
    odd.append(d)
  if spec.kind == inputs.DIR:
    odd.append(f)
  if spec.kind in (inputs.NEW_DIR, inputs.WORKDIR):
    odd += [f, "asset:tinystories-260k"]
  if spec.kind == inputs.NEW_DIR:
    odd.append(full)
  if spec.kind == inputs.NEW_FILE:
    odd.append(d)
  if spec.suffix:
    odd.append(str(root / "out.txt"))
  out = [st.sampled_from(odd)]
  if spec.kind in inputs.INPUTS:  # any name under a missing folder is missing
    names = st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=16)
    out.append(names.map(lambda n: str(root / "missing" / n)))
    if spec.many:
      out.append(names.map(lambda n: f"{f},{root / 'missing' / n}"))
  return st.one_of(out)


def bad_values(decl, root: Path) -> st.SearchStrategy[str] | None:
  """Command-line texts that `decl` must refuse; None if it accepts any text."""
  if isinstance(decl, tuple):
    return st.one_of(_TEXT, st.sampled_from(["", " ", "NONE"])).filter(lambda s: s not in decl)
  if isinstance(decl, inputs.Choice):
    return st.one_of(_TEXT, st.just("")).filter(lambda s: s not in decl.options)
  if isinstance(decl, inputs.Path):
    return _paths(decl, root)
  if isinstance(decl, (inputs.Int, inputs.Float)):
    return _numbers(decl)
  if isinstance(decl, inputs.Bool):
    return _TEXT.filter(lambda s: s.strip().lower() not in ("true", "t", "1", "false", "f", "0"))
  if isinstance(decl, inputs.Ints):
    item = decl.item
    good = "1"
    return st.one_of(
        st.sampled_from(["", ",", "x", "1,,1", "1.5,1,1", good * 2, "1,1", "1,1,1,1"]),
        st.integers(max_value=item.ge - 1).filter(lambda v: v not in item.also).map(
            lambda v: ",".join([str(v)] + [good] * ((decl.count or 1) - 1)))
    ).filter(lambda s: _ints(s) is None or decl.problem(_ints(s)) is not None)
  if isinstance(decl, inputs.Text):
    bad = next((v for k, v in _BAD_FORMATS.items() if decl.what.startswith(k)), None)
    if bad is None:
      return _TEXT.filter(lambda s: not s.strip()) if decl.nonempty else None
    return st.sampled_from(bad)
  raise AssertionError(f"no strategy for {decl!r}")


def _ints(s: str):
  try:
    return tuple(int(x) for x in s.split(","))
  except ValueError:
    return None


def _names_it(err: str, names: list[str]) -> bool:
  low = err.lower()
  return any(n.lower() in low for n in names)


def _check_refused(root: Path, argv: list[str], names: list[str]) -> None:
  before = _snapshot(root)
  try:
    rc, err = _run(argv)
  except ReachedCommand:
    raise AssertionError(f"accepted: medjax {' '.join(map(repr, argv))}") from None
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 1, (argv, err)
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith("medjax"), err
  assert _names_it(lines[0], names), (names, lines[0])
  assert _snapshot(root) == before, f"something was written: {argv}"


@pytest.mark.parametrize(
    "words,parser,action,decl", FUZZED,
    ids=[f"{' '.join(w)} {cli_args.flag_name(a)}" for w, _, a, _ in FUZZED])
def test_flags_refuse_bad_values(root, words, parser, action, decl):
  strategy = bad_values(decl, root)
  positionals, opts = _baseline(root, words)
  flag = cli_args.flag_name(action)
  # A flag of a mutually exclusive group replaces its sibling in the baseline.
  for g in parser._mutually_exclusive_groups:
    if action in g._group_actions:
      for other in g._group_actions:
        opts.pop(cli_args.flag_name(other), None)
  names = [flag, action.dest, *action.option_strings]

  @FUZZ
  @given(value=strategy)
  def check(value):
    pos, o = list(positionals), dict(opts)
    if action.option_strings:
      o[flag] = [value]
    else:
      index = [a for a in parser._actions if not a.option_strings].index(action)
      pos[index:index + 1] = [value]
    _check_refused(root, _argv(words, pos, o), names)

  check()


# data.columns and frozen are free text (frozen prefixes are checked once the model is known).
FUZZED_FIELDS = sorted(k for k, s in runconfig.FIELDS.items()
                       if bad_values(s, Path("/")) is not None)


@pytest.mark.parametrize("field", FUZZED_FIELDS)
def test_config_fields_refuse_bad_values(root, field):
  strategy = bad_values(runconfig.FIELDS[field], root)
  base = ["train", "--config", CONFIG, "--workdir", str(root / "w")]

  @FUZZ
  @given(value=strategy)
  def check(value):
    _check_refused(root, base + [f"--config.{field}={value}"], [f"config.{field}"])

  check()


def test_unknown_fields_and_flags_are_named(root):
  for argv, name in [(["train", "--config", CONFIG, "--workdir", "w", "--config.nope=1"],
                      "config.nope"),
                     (["eval", "--checkpoint", str(root / "dir"), "--text",
                       str(root / "file.txt"), "--nope"], "--nope"),
                     (["data", "shw"], "shw")]:
    _check_refused(root, argv, [name])


def test_path_problems_cover_every_kind(tmp_path):
  """Direct checks of `inputs.path_problem`, including what a shell cannot pass."""
  f = tmp_path / "f"
  f.write_text("x")
  P = inputs.path_problem
  assert P(str(f), inputs.FILE) is None and P(str(tmp_path), inputs.DIR) is None
  assert P(str(tmp_path / "new" / "deeper"), inputs.NEW_DIR) is None
  assert "no such file" in P(str(tmp_path / "x"), inputs.FILE)
  assert "is a folder, not a file" in P(str(tmp_path), inputs.FILE)
  assert "is a file, not a folder" in P(str(f), inputs.WORKDIR)
  assert f"{f} is a file" in P(str(f / "x" / "y"), inputs.NEW_DIR)
  assert "not empty" in P(str(tmp_path), inputs.NEW_DIR)
  assert P(str(tmp_path), inputs.NEW_DIR, overwrite=True) is None
  assert "NUL" in P("a\x00b", inputs.FILE)
  assert "longer than 255 bytes" in P("a" * 256, inputs.NEW_FILE)
  assert "gcsfuse" in P("gs://b/x", inputs.WORKDIR)
  assert "asset not found" in P("asset:nope", inputs.FILE)
  assert P("asset:tinystories-260k", inputs.DIR) is None
  assert "not a valid file name" in P("a\ud800b", inputs.FILE)  # found by the fuzzer
  assert "'a\\nb'" in inputs.shown("a\nb")  # a newline in a name stays on one line


def test_a_field_without_a_declaration_is_refused():
  c = inputs.Fields()
  c.n = inputs.Int(3, ge=1)
  with pytest.raises(TypeError, match=r"c.m = Int\(3, ge=0\)"):
    c.m = 3
  d = c.defaults()
  assert d.n == 3 and runconfig.base_config().data.seq_len == runconfig.FIELDS[
      "data.seq_len"].default
