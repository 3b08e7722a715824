"""Orbax's log lines that are not the user's concern, filtered once for the process.

A run's console should show progress, results and real warnings. Orbax logs through absl:
- "Metadata file does not exist: .../STEP/state/_CHECKPOINT_METADATA" whenever one item of
  a training checkpoint is read on its own (eval, export, `medjax.load` of a workdir, the
  demo): a CheckpointManager step keeps that file at the step level, not in each item's
  folder, so orbax finds none there and falls back to the item's own metadata. Nothing
  is wrong; the line is dropped.
- "Setting the target_byte_size too small could reduce performance." at every save of a
  model whose layer is under 1 MiB (the demo's and the tests' tiny ones): training
  checkpoints store one layer per chunk (`manager.stacked_save_args`), and orbax warns about
  chunks that small. A real model's layer is tens of MiB; the line is dropped.
- when a write fails, a full traceback from each of its save threads, and asyncio one per
  failed write task: the failure reaches the user once, as a one-line CheckpointError
  (traceback with --debug); the tracebacks and the asyncio repeats are dropped.
Everything else orbax logs at WARNING or above still shows.
"""

from __future__ import annotations

import logging
import sys


class _Quiet(logging.Filter):

  def filter(self, record):
    if record.name == "asyncio" and "orbax" in str(record.msg) + str(record.args):
      return False  # "Task exception was never retrieved" + the task: the same failure again
    if "orbax" in record.pathname:
      if str(record.msg).startswith("Metadata file does not exist") and \
          "_CHECKPOINT_METADATA" in str(record.args):
        return False
      if str(record.msg).startswith("Setting the target_byte_size too small"):
        return False
      record.exc_info, record.exc_text = None, None
    return True


_QUIET = _Quiet()


def _quiet_unraisable(hook):
  """After a failed write, tensorstore completes the pending futures of orbax's (closed)
  event loops; each prints 'Event loop is closed' with a traceback. Only those are dropped."""
  if getattr(hook, "_medjax", False):
    return hook

  def quiet(u):
    if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
      hook(u)

  quiet._medjax = True
  return quiet


def install() -> None:
  """Adds the filters (idempotent); modules that use orbax call it when imported."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _QUIET not in logger.filters:
      logger.addFilter(_QUIET)
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
