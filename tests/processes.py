"""Process helpers for the tests that check no TFF worker is left behind."""

import time

import psutil


def gone(pid: int, timeout: float = 15.0) -> bool:
  """Whether `pid` exits (or is a zombie) within `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
        return True
    except psutil.NoSuchProcess:
      return True
    time.sleep(0.1)
  return False
