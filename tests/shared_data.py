"""Locates the real MovieLens copies in ../shared/data for tests."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA_DIR = os.environ.get(
    'TFF_REC_SHARED_DATA', os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data')
)


def shared_file(name: str) -> str:
  """Path of a file in the shared data folder; skips (or fails in CI) if absent."""
  path = os.path.join(SHARED_DATA_DIR, name)
  if not os.path.exists(path):
    message = f'shared data file {path} not found'
    if os.environ.get('TFF_REC_REQUIRE_SHARED_DATA') == '1':
      pytest.fail(message)
    pytest.skip(message)
  return path
