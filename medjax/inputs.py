"""What an input accepts, declared once next to its default and checked in one place.

Run-config fields (`training.config.base_config`) and command flags (`cli.args`) share
these specs:

  c.data.seq_len = Int(256, ge=1)                  # a config field: default, then range
  p.add_argument("--limit", type=Int(ge=1))        # a flag: argparse calls the spec
  args.path(p, "--out", kind=NEW_DIR)              # a path flag, checked before the run

`problem(value)` says why a value is refused (None when it is accepted) in words that
name what is accepted ("accepts an int >= 1"); the caller prefixes the field or flag.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
from typing import Any, Callable, Iterable

from medjax.assets import PREFIX as ASSET_PREFIX
from medjax.assets import resolve
from medjax.errors import MedjaxError

# Path kinds. Inputs must exist; outputs must be creatable, or an existing folder (WORKDIR:
# reused, e.g. to resume) or an empty one (NEW_DIR: non-empty needs --overwrite).
FILE, DIR, FILE_OR_DIR = "file", "folder", "file or folder"
NEW_DIR, WORKDIR, NEW_FILE = "new folder", "folder to write in", "file to write"
INPUTS = (FILE, DIR, FILE_OR_DIR)
OUTPUTS = (NEW_DIR, WORKDIR, NEW_FILE)


class Spec:
  """A value's type and the values it accepts; `default` is the config field's default."""

  py_type: type = object

  def __init__(self, default: Any = None, *, optional: bool = False):
    self.default = default
    self.optional = optional or default is None

  def accepts(self) -> str:
    """What is accepted, e.g. "an int >= 1"."""
    raise NotImplementedError

  def problem(self, value) -> str | None:
    """Why `value` is refused, or None."""
    if value is None:
      return None if self.optional else f"accepts {self.accepts()}"
    return self._problem(value)

  def _problem(self, value) -> str | None:
    raise NotImplementedError

  def parse(self, text: str):
    """A command-line string -> a value (ValueError if it is not one)."""
    return text

  def __call__(self, text: str):
    """argparse `type=`: the value, or ArgumentTypeError naming what is accepted."""
    try:
      value = self.parse(text)
    except (ValueError, OverflowError):
      raise argparse.ArgumentTypeError(f"invalid value {text!r}: accepts {self.accepts()}")
    p = self.problem(value)
    if p:
      raise argparse.ArgumentTypeError(f"invalid value {text!r}: {p}")
    return value

  def __repr__(self):
    return f"{type(self).__name__}({self.default!r}: {self.accepts()})"


def _interval(ge, gt, le, lt) -> str:
  lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
  hi = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
  if lo and hi:
    return f" in {lo}, {hi}"
  if lo:
    return f" >= {ge}" if ge is not None else f" > {gt}"
  if hi:
    return f" <= {le}" if le is not None else f" < {lt}"
  return ""


class _Number(Spec):
  noun = "a number"

  def __init__(self, default=None, *, ge=None, gt=None, le=None, lt=None, also=(),
               optional=False):
    super().__init__(default, optional=optional)
    self.ge, self.gt, self.le, self.lt, self.also = ge, gt, le, lt, tuple(also)

  def accepts(self) -> str:
    extra = "".join(f" or {a}" for a in self.also)
    return f"{self.noun}{_interval(self.ge, self.gt, self.le, self.lt)}{extra}"

  def _typed(self, v) -> bool:
    raise NotImplementedError

  def _problem(self, v):
    if not self._typed(v):
      return f"accepts {self.accepts()}"
    if v in self.also:
      return None
    if ((self.ge is not None and not v >= self.ge) or (self.gt is not None and not v > self.gt)
        or (self.le is not None and not v <= self.le)
        or (self.lt is not None and not v < self.lt)):
      return f"accepts {self.accepts()}"
    return None


class Int(_Number):
  """An int (not a bool) in a range; `also`: single values accepted outside it (-1)."""

  noun, py_type = "an int", int

  def _typed(self, v):
    return isinstance(v, int) and not isinstance(v, bool)

  def parse(self, text):
    return int(text)


class Float(_Number):
  """A finite number (ints too) in a range."""

  py_type = float

  def _typed(self, v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))

  def parse(self, text):
    return float(text)


class Bool(Spec):
  py_type = bool

  def accepts(self):
    return "true or false"

  def _problem(self, v):
    return None if isinstance(v, bool) else f"accepts {self.accepts()}"

  def parse(self, text):  # as absl's boolean flags
    t = text.strip().lower()
    if t in ("true", "t", "1"):
      return True
    if t in ("false", "f", "0"):
      return False
    raise ValueError(text)


class Choice(Spec):
  """One of a fixed set of strings."""

  py_type = str

  def __init__(self, default=None, options: Iterable[str] = (), *, optional=False):
    super().__init__(default, optional=optional)
    self.options = tuple(options)

  def accepts(self):
    return f"one of {', '.join(self.options)}"

  def _problem(self, v):
    return None if isinstance(v, str) and v in self.options else f"accepts {self.accepts()}"


class Text(Spec):
  """A string; `check(value)` may refuse it by raising MedjaxError or ValueError (its
  message is the problem), e.g. a sharding-rules parser."""

  py_type = str

  def __init__(self, default=None, *, nonempty=False, check: Callable | None = None,
               what: str = "a string", optional=False):
    super().__init__(default, optional=optional)
    self.nonempty, self.check, self.what = nonempty, check, what

  def accepts(self):
    return f"{self.what}{' (non-empty)' if self.nonempty else ''}"

  def _problem(self, v):
    if not isinstance(v, str) or (self.nonempty and not v.strip()):
      return f"accepts {self.accepts()}"
    if self.check is not None:
      try:
        self.check(v)
      except (MedjaxError, ValueError) as e:
        return f"{_strip_prefix(str(e), v)} (accepts {self.accepts()})"
    return None


def _strip_prefix(msg: str, value: str) -> str:
  # A parser's message often starts with a name and the value; keep its reason only.
  for head in (f"{value!r}: ", f"{value}: "):
    if head in msg[: len(head) + 40]:
      return msg.split(head, 1)[1]
  return msg


def host_port(text: str) -> None:
  """ValueError unless `text` is HOST:PORT with a port in 1..65535 (a coordinator)."""
  host, _, port = text.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{text!r} is not HOST:PORT with a port in 1..65535")


class Ints(Spec):
  """Comma-separated ints, e.g. a mesh "1,-1,1" (`count` of them when given)."""

  py_type = str

  def __init__(self, default=None, *, count: int | None = None, ge=None, also=(),
               optional=False):
    super().__init__(default, optional=optional)
    self.count, self.item = count, Int(ge=ge, also=also)

  def accepts(self):
    n = f"{self.count} " if self.count else ""
    each = self.item.accepts().removeprefix("an int").strip()
    return f"{n}comma-separated ints" + (f", each {each}" if each else "")

  def parse(self, text):
    return tuple(int(x) for x in text.split(","))

  def _problem(self, v):
    if (not isinstance(v, tuple) or not v or (self.count and len(v) != self.count)
        or any(self.item.problem(x) for x in v)):
      return f"accepts {self.accepts()}"
    return None


class Path(Spec):
  """A local path of a given kind (module constants). `empty_ok`: "" means "none";
  `many`: comma-separated paths; `prefixed`: {"tfds:": DIR} names after a prefix;
  `asset:NAME` is always accepted for inputs; `suffix`: the name must end with it."""

  py_type = str

  def __init__(self, default=None, kind: str = FILE, *, empty_ok=False, many=False,
               prefixed: dict[str, str] | None = None, suffix: str = "", optional=False):
    super().__init__(default, optional=optional)
    assert kind in INPUTS + OUTPUTS, kind
    self.kind, self.empty_ok, self.many = kind, empty_ok, many
    self.prefixed, self.suffix = dict(prefixed or {}), suffix

  def accepts(self):
    many = {FILE: "files", DIR: "folders", FILE_OR_DIR: "files or folders"}.get(self.kind)
    what = f"comma-separated {many}" if self.many and many else f"a path to a {self.kind}"
    if self.kind in OUTPUTS:
      what = f"a path where a {self.kind} can be written"
    if self.suffix:
      what += f" ending in {self.suffix}"
    return what + (' ("" for none)' if self.empty_ok else "")

  def problem(self, value, overwrite: bool = False) -> str | None:
    if value is None and self.optional:
      return None
    if not isinstance(value, str):
      return f"accepts {self.accepts()}"
    items = [x.strip() for x in value.split(",")] if self.many else [value]
    items = [x for x in items if x] if self.many else items
    if not items or items == [""]:
      return None if self.empty_ok else f"empty path (accepts {self.accepts()})"
    for item in items:
      kind = self.kind
      for pre, k in self.prefixed.items():
        if item.startswith(pre):
          item, kind = item[len(pre):], k
      p = path_problem(item, kind, overwrite)
      if p is None and self.suffix and not item.endswith(self.suffix):
        p = f"expected a name ending in {self.suffix}"
      if p:
        return f"{shown(item)}: {p}" if len(items) > 1 or item != value else p
    return None


def shown(text: str) -> str:
  """`text` for a one-line message: as is, or quoted with escapes if it holds a newline or
  another unprintable character (file names may)."""
  return text if text.isprintable() else repr(text)


def _stat(path: str) -> tuple[os.stat_result | None, OSError | None]:
  try:
    return os.stat(path), None
  except FileNotFoundError:
    return None, None
  except OSError as e:  # ENOTDIR (a file on the way), ENAMETOOLONG, ELOOP, EACCES
    return None, (None if e.errno == errno.ENOTDIR else e)
  except ValueError as e:  # not representable as a file name
    return None, OSError(errno.EINVAL, str(e))


def _nearest_existing(path: str) -> str:
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  return parent


def path_problem(path: str, kind: str, overwrite: bool = False) -> str | None:
  """Why `path` cannot serve as `kind`, or None.

  Inputs must exist with that kind and be readable. Outputs must be an existing folder
  of the right kind (a NEW_DIR empty unless `overwrite`), or be creatable: the nearest
  existing parent is a writable folder.

  Args:
    path: a local path; `asset:NAME` for inputs.
    kind: FILE, DIR, FILE_OR_DIR, NEW_DIR, WORKDIR or NEW_FILE.
    overwrite: a non-empty NEW_DIR may be replaced.
  Returns:
    The problem in a few words ("is a file, not a folder"), or None.
  """
  if path == "":
    return "empty path"
  if "\x00" in path:
    return "contains a NUL character"
  if path.startswith("gs://"):
    return ("gs:// paths are not opened directly; mount the bucket with gcsfuse and pass "
            "/gcs/BUCKET/... (scripts/tpu_install.sh does)")
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
    return "is a URL; medjax reads and writes local paths only"
  if path.startswith(ASSET_PREFIX):
    if kind not in INPUTS:
      return "is a shipped asset, not a place to write"
    try:
      path = resolve(path)
    except MedjaxError as e:
      return str(e).split(": ", 1)[-1]
  try:
    raw = os.fsencode(path)
  except UnicodeEncodeError:  # e.g. a lone surrogate from a config file
    return "is not a valid file name (it has a character the file system cannot encode)"
  if any(len(part) > 255 for part in raw.split(os.fsencode(os.sep))):
    return "a name in it is longer than 255 bytes"
  st, err = _stat(path)
  if err is not None:
    return f"cannot be accessed ({err.strerror})"
  is_dir = st is not None and os.path.isdir(path)
  if kind in INPUTS:
    if st is None:
      return f"no such {kind}"
    if kind == FILE and is_dir:
      return "is a folder, not a file"
    if kind == DIR and not is_dir:
      return "is a file, not a folder"
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
      return "is not readable"
    return None
  if st is not None:
    if kind == NEW_FILE:
      if is_dir:
        return "is a folder, not a file"
      return None if os.access(path, os.W_OK) else "is not writable"
    if not is_dir:
      return "is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
      return "is not writable"
    if kind == NEW_DIR and not overwrite:
      try:
        if os.listdir(path):
          return "folder is not empty (pass --overwrite to replace it)"
      except OSError as e:
        return f"cannot be listed ({e.strerror})"
    return None
  parent = _nearest_existing(path)
  if not os.path.isdir(parent):
    return f"cannot be created: {parent} is a file, not a folder"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot be created: {parent} is not writable"
  return None


def inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it (after resolving links)."""
  p, f = os.path.realpath(path), os.path.realpath(folder)
  return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


# ------------------------------------------------------------------ declared config trees


class Fields:
  """A tree of declared fields, written like a ConfigDict: `c.data = Fields()`, then
  `c.data.seq_len = Int(256, ge=1)`. `defaults()` is the ConfigDict of defaults; `flat()`
  maps "data.seq_len" to its spec. Assigning anything but a Spec or Fields is refused, so
  every field of the tree declares what it accepts."""

  def __init__(self):
    object.__setattr__(self, "_items", {})

  def __setattr__(self, name, value):
    if not isinstance(value, (Spec, Fields)):
      spec = {bool: "Bool({!r})", int: "Int({!r}, ge=0)", float: "Float({!r}, ge=0)"}.get(
          type(value), "Text({!r}) or Choice/Path").format(value)
      raise TypeError(f"field {name}={value!r} has no declaration of what it accepts; write "
                      f"e.g. c.{name} = {spec} (specs: medjax/inputs.py)")
    self._items[name] = value

  def __getattr__(self, name):
    try:
      return self._items[name]
    except KeyError:
      raise AttributeError(name) from None

  def flat(self, prefix: str = "") -> dict[str, Spec]:
    out = {}
    for k, v in self._items.items():
      if isinstance(v, Fields):
        out.update(v.flat(f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  def defaults(self):
    """The ConfigDict of defaults (a typed placeholder where the default is None)."""
    import ml_collections
    from ml_collections import config_dict
    c = ml_collections.ConfigDict()
    for k, v in self._items.items():
      if isinstance(v, Fields):
        c[k] = v.defaults()
      elif v.default is None:
        c[k] = config_dict.placeholder(v.py_type)
      else:
        c[k] = v.default
    return c
