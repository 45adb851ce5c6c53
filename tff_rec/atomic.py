"""Atomic file writes: readers see the old file or the whole new one, never part."""

from __future__ import annotations

import os
import tempfile
from typing import Union


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write(path: str, data: Union[str, bytes]) -> str:
  """Writes `data` to `path` via a temporary sibling and `os.replace`; returns path.

  Creates missing parent directories. The file gets the usual permissions
  (0666 minus the umask), not mkstemp's 0600. On any error (or interrupt) the
  temporary file is removed and `path` is left as it was.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
