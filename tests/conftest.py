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
