"""No TFF worker_binary outlives the Python process that started it."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests import processes
from tests import shared_data

_CHILD = textwrap.dedent('''
    import signal, sys, time
    # Ctrl-C's default, even when the test runs where SIGINT is inherited ignored
    # (e.g. a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from tff_rec import runtime
    import tensorflow as tf
    import tensorflow_federated as tff

    worker = runtime.set_local_context()

    @tff.tensorflow.computation
    def add_one():
      return tf.constant(1) + 1

    assert add_one() == 2
    print(f'WORKER {worker.worker_pid}', flush=True)
    mode = sys.argv[1]
    if mode == 'exception':
      raise RuntimeError('boom')
    if mode == 'wait':
      print('READY', flush=True)
      time.sleep(600)
''')


def _worker_binaries() -> set[int]:
  pids = set()
  for p in psutil.process_iter(['pid', 'name', 'cmdline']):
    try:
      if any('worker_binary' in part for part in (p.info['cmdline'] or [])):
        pids.add(p.info['pid'])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
  return pids


def _start(mode: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=shared_data.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, '-c', _CHILD, mode],
      cwd=shared_data.REPO_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )


def _read_worker_pid(proc: subprocess.Popen, wait_ready: bool = False) -> int:
  pid = None
  for line in proc.stdout:
    if line.startswith('WORKER '):
      pid = int(line.split()[1])
      if not wait_ready:
        break
    if line.startswith('READY'):
      break
  assert pid is not None, proc.stderr.read()
  return pid


@pytest.mark.parametrize('mode,expect_code', [('normal', 0), ('exception', 1)])
def test_worker_dies_with_parent_on_exit(mode, expect_code):
  proc = _start(mode)
  worker = _read_worker_pid(proc)
  code = proc.wait(timeout=120)
  assert code == expect_code
  assert processes.gone(worker), f'worker_binary {worker} outlived its parent ({mode})'


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_worker_dies_with_parent_on_signal(sig):
  proc = _start('wait')
  try:
    worker = _read_worker_pid(proc, wait_ready=True)
    assert worker in _worker_binaries()
    proc.send_signal(sig)  # SIGINT is what Ctrl-C delivers.
    proc.wait(timeout=60)
    assert processes.gone(worker), f'worker_binary {worker} outlived its parent ({sig.name})'
  finally:
    if proc.poll() is None:  # a failed test must not leave the sleeping child behind
      proc.kill()
      proc.wait(timeout=60)


def test_no_worker_started_by_tff_default_context_leaks():
  """Our context replaces TFF's default one, so TFF never spawns its own."""
  proc = _start('normal')
  worker = _read_worker_pid(proc)
  proc.wait(timeout=120)
  # Every worker_binary whose parent was the child is the one we started.
  assert processes.gone(worker)
  leftovers = [p for p in _worker_binaries() if _parent_was(p, proc.pid)]
  assert not leftovers


def _parent_was(pid: int, parent: int) -> bool:
  try:
    return psutil.Process(pid).ppid() == parent
  except psutil.NoSuchProcess:
    return False


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
