"""tff_rec.atomic.write: whole files or nothing."""

import sys
import os
import stat

import pytest

from tff_rec import atomic


def test_writes_text_and_bytes_creating_parents(tmp_path):
  path = tmp_path / 'a' / 'b' / 'out.txt'
  assert atomic.write(str(path), 'héllo\n') == str(path)
  assert path.read_text(encoding='utf-8') == 'héllo\n'
  atomic.write(str(path), b'\x00\x01')
  assert path.read_bytes() == b'\x00\x01'
  assert os.listdir(path.parent) == ['out.txt']


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
  old = os.umask(0o022)
  try:
    path = tmp_path / 'f.json'
    atomic.write(str(path), '{}')
  finally:
    os.umask(old)
  assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'keep.txt'
  path.write_text('old')

  def fail(*args):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    atomic.write(str(path), 'new')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['keep.txt']


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
