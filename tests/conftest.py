"""Shared test set-up: every test sees the environment it started with.

`medjax fit` / `medjax bench fit` set XLA_FLAGS for their CPU stand-in devices when run
in-process; subprocesses started by later tests (training runs, the crash campaign) must not
inherit that.

Tests run on the CPU backend (JAX_PLATFORMS=cpu, inherited by the subprocesses they start):
with libtpu installed (for `medjax fit`'s TPU compiles, which need no TPU backend) jax would
otherwise try to start a TPU backend, print libtpu's warnings, and wait on libtpu's lock
while another process holds it.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _restore_environ():
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)
