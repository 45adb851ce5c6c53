"""Errors raised for bad rating data, naming the file and line at fault."""

from typing import Optional


class DataError(ValueError):
  """Bad input data: a missing file, a malformed line, a failed check."""

  def __init__(
      self,
      message: str,
      *,
      path: Optional[str] = None,
      line: Optional[int] = None,
  ):
    self.path = path
    self.line = line
    where = ''
    if path is not None:
      where = f'{path}:{line}: ' if line is not None else f'{path}: '
    super().__init__(where + message)


class IntegrityError(DataError):
  """Downloaded or cached data does not match its expected checksum or size."""
