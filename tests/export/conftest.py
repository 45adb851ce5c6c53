"""Session-wide small training runs (see tests/export/run_fixtures.py)."""

import pytest

from tests.export import run_fixtures


@pytest.fixture(scope='session')
def runs_root(tmp_path_factory):
  return run_fixtures.session_root(tmp_path_factory)


@pytest.fixture(scope='session')
def mf_run(runs_root):
  return run_fixtures.central_mf(runs_root)


@pytest.fixture(scope='session')
def fedrecon_run(runs_root, tff_context):  # pylint: disable=unused-argument
  return run_fixtures.fedrecon_mf(runs_root)
