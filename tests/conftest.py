"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope='session', autouse=True)
def _quiet_tff_default_context():
  """TFF's import-time context complains at exit unless disarmed (see runtime)."""
  yield
  import sys  # pylint: disable=g-import-not-at-top
  if 'tensorflow_federated' in sys.modules:
    from tff_rec import runtime  # pylint: disable=g-import-not-at-top
    runtime.disarm_default_context()


@pytest.fixture(scope='session')
def tff_context():
  """One orphan-safe local TFF context for the whole test session."""
  from tff_rec import runtime  # pylint: disable=g-import-not-at-top

  runtime.ensure_context()
  yield


# Small training runs shared by tests/export and tests/compression
# (see tests/export/run_fixtures.py).


@pytest.fixture(scope='session')
def runs_root(tmp_path_factory):
  from tests.export import run_fixtures  # pylint: disable=g-import-not-at-top
  return run_fixtures.session_root(tmp_path_factory)


@pytest.fixture(scope='session')
def mf_run(runs_root):  # pylint: disable=redefined-outer-name
  from tests.export import run_fixtures  # pylint: disable=g-import-not-at-top
  return run_fixtures.central_mf(runs_root)


@pytest.fixture(scope='session')
def fedrecon_run(runs_root, tff_context):  # pylint: disable=redefined-outer-name,unused-argument
  from tests.export import run_fixtures  # pylint: disable=g-import-not-at-top
  return run_fixtures.fedrecon_mf(runs_root)
