"""Shared test set-up: every test sees the environment it started with.

`medjax fit` / `medjax bench fit` set XLA_FLAGS for their CPU stand-in devices when run
in-process; subprocesses started by later tests (training runs, the crash campaign) must not
inherit that.
"""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)
