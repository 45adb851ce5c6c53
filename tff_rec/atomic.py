"""Atomic file writes: readers see the old file or the whole new one, never part."""

from __future__ import annotations

import json
import math
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


def _jsonable(value, where: str, inf_as_string: bool):
  """`value` with numpy scalars/arrays as Python values; ValueError at a non-finite float."""
  if hasattr(value, 'tolist') and not isinstance(value, (str, bytes)):
    value = value.tolist()
  elif hasattr(value, 'item') and callable(value.item) and not isinstance(value, (str, bytes)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    if inf_as_string and math.isinf(value):
      return 'inf' if value > 0 else '-inf'
    raise ValueError(f'{where} is {value!r}; JSON has no such number and nothing here is written '
                     'silently wrong')
  if isinstance(value, dict):
    return {str(k): _jsonable(v, f'{where}.{k}', inf_as_string) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f'{where}[{i}]', inf_as_string) for i, v in enumerate(value)]
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  return str(value)


def write_json(path: str, value, *, inf_as_string: bool = False, indent: int = 2,
               sort_keys: bool = False) -> str:
  """Writes strict JSON (no NaN/Infinity literals) to `path` atomically; returns path.

  A NaN or infinite number raises ValueError naming the file and the key,
  and nothing is written; with `inf_as_string`, infinities (e.g. the ε of a
  run without noise) are written as the strings "inf" / "-inf".
  """
  clean = _jsonable(value, os.path.basename(path), inf_as_string)
  return write(path, json.dumps(clean, indent=indent, sort_keys=sort_keys, allow_nan=False) + '\n')
