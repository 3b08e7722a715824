"""The samples shipped inside the package (README.md here lists them with their licenses).

A user's clone has no development data, so the demo and the defaults read these; a config
names one as `asset:NAME` (e.g. `init_from = "asset:tinystories-260k"`).
"""

from __future__ import annotations

from pathlib import Path

from medjax.errors import DataError

ASSETS = Path(__file__).parent
PREFIX = "asset:"


def asset_path(name: str) -> Path:
  """The path of a shipped sample (e.g. "cmexam_sample.csv", "tinystories-260k")."""
  p = ASSETS / name
  if not p.exists() or name.endswith(".py"):
    shipped = sorted(x.name for x in ASSETS.iterdir() if not x.name.startswith(("_", ".")))
    raise DataError(f"{p}: asset not found (shipped assets: {', '.join(shipped)})")
  return p


def resolve(path: str) -> str:
  """'asset:NAME' -> the shipped sample's path; any other path unchanged."""
  if path.startswith(PREFIX):
    return str(asset_path(path[len(PREFIX):]))
  return path
