"""TFF execution contexts whose C++ worker processes never outlive us.

TFF's default context starts a `worker_binary` subprocess that is left running
after Python exits. Here we start the worker ourselves, in a new session, with
`PR_SET_PDEATHSIG=SIGKILL` (the kernel kills it when we die, even by SIGKILL),
and stop it from `atexit` and on SIGTERM. Contexts talk to workers through
TFF's own `RemoteExecutor`; remote workers (`host:port`) are combined with
TFF's mergeable-computation execution context.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from absl import logging
import grpc
import portpicker

_GRPC_OPTIONS = [
    ('grpc.max_message_length', 2 * 1000 * 1000 * 1000),
    ('grpc.max_receive_message_length', 2 * 1000 * 1000 * 1000),
    ('grpc.max_send_message_length', 2 * 1000 * 1000 * 1000),
]
_PR_SET_PDEATHSIG = 1
_STARTUP_TIMEOUT_SEC = 60.0

_lock = threading.Lock()
_live_workers: list['LocalWorker'] = []
_installed = False


class WorkerError(RuntimeError):
  """A TFF worker could not be started or reached, or died."""


def worker_binary_path() -> str:
  """Path of the `worker_binary` shipped inside the TFF wheel."""
  import tensorflow_federated  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(tensorflow_federated.__file__), 'data', 'worker_binary')
  if not os.path.isfile(path):
    raise WorkerError(f'TFF worker binary not found at {path}')
  return path


def _die_with_parent() -> None:
  """preexec_fn: ask the kernel to SIGKILL the child when its parent dies."""
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    os._exit(127)  # pylint: disable=protected-access
  # The parent may already be gone between fork and prctl.
  if os.getppid() == 1:
    os._exit(0)  # pylint: disable=protected-access


class LocalWorker:
  """A TFF C++ `worker_binary` child process bound to this process's life."""

  def __init__(
      self,
      port: Optional[int] = None,
      max_concurrent_computation_calls: int = -1,
      log_path: Optional[str] = None,
  ):
    self.port = port or portpicker.pick_unused_port()
    self.max_concurrent_computation_calls = max_concurrent_computation_calls
    self.log_path = log_path
    self.process: Optional[subprocess.Popen] = None

  @property
  def address(self) -> str:
    return f'localhost:{self.port}'

  def start(self) -> 'LocalWorker':
    """Starts the worker (from the calling thread) and registers its cleanup."""
    if threading.current_thread() is not threading.main_thread():
      # PDEATHSIG fires when the *thread* that forked exits.
      raise WorkerError('start TFF workers from the main thread')
    out = open(self.log_path, 'ab') if self.log_path else subprocess.DEVNULL
    try:
      self.process = subprocess.Popen(
          [
              worker_binary_path(),
              f'--port={self.port}',
              f'--max_concurrent_computation_calls={self.max_concurrent_computation_calls}',
          ],
          stdin=subprocess.DEVNULL,
          stdout=out,
          stderr=out,
          preexec_fn=_die_with_parent,
          start_new_session=True,  # Ctrl-C in a terminal reaches only us.
          close_fds=True,
      )
    finally:
      if out is not subprocess.DEVNULL:
        out.close()
    with _lock:
      _live_workers.append(self)
    _install_exit_hooks()
    logging.info('Started TFF worker pid %d on port %d', self.process.pid, self.port)
    return self

  def alive(self) -> bool:
    return self.process is not None and self.process.poll() is None

  def stop(self, timeout: float = 5.0) -> None:
    """Stops the worker: SIGINT, then SIGKILL after `timeout` seconds."""
    proc = self.process
    if proc is None:
      return
    if proc.poll() is None:
      try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      except ProcessLookupError:
        pass
    with _lock:
      if self in _live_workers:
        _live_workers.remove(self)


def stop_all_workers() -> None:
  """Stops every worker this process started."""
  with _lock:
    workers = list(_live_workers)
  for w in workers:
    w.stop()


def _sigterm_handler(signum, frame):  # pylint: disable=unused-argument
  stop_all_workers()
  raise SystemExit(128 + signum)


_hooks_installed = False


def _install_exit_hooks() -> None:
  global _hooks_installed
  if _hooks_installed:
    return
  _hooks_installed = True
  atexit.register(stop_all_workers)
  if threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      signal.signal(signal.SIGTERM, _sigterm_handler)


def _wait_ready(stub, address: str, worker: Optional[LocalWorker]) -> None:
  deadline = time.monotonic() + _STARTUP_TIMEOUT_SEC
  while not stub.is_ready:
    if worker is not None and not worker.alive():
      raise WorkerError(
          f'TFF worker at {address} exited with status {worker.process.returncode} '
          'during start-up'
      )
    if time.monotonic() > deadline:
      raise WorkerError(f'TFF worker at {address} not ready after {_STARTUP_TIMEOUT_SEC:.0f}s')
    time.sleep(0.1)


def _executor_factory(address: str, worker: Optional[LocalWorker], default_num_clients: int):
  """A TFF executor factory sending everything to the worker at `address`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.types import placements  # pylint: disable=g-import-not-at-top

  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  _wait_ready(stub, address, worker)

  def stack_fn(cardinalities):
    if worker is not None and not worker.alive():
      raise WorkerError(
          f'TFF worker at {address} died (exit status {worker.process.returncode}); '
          'rerun the same command to resume from the last checkpoint'
      )
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    ex = tff.framework.RemoteExecutor(stub)
    ex.set_cardinalities(cardinalities)
    return ex

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _compiler(secure_intrinsics: bool):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if not secure_intrinsics:
    return tff.backends.native.desugar_and_transform_to_native

  def compile_fn(comp):
    # The C++ runtime has no secure-sum kernels; TFF's test backend lowers
    # federated_secure_sum(_bitwidth) to their exact (modular) sum bodies.
    comp = tff.backends.test.replace_secure_intrinsics_with_bodies(comp)
    return tff.backends.native.desugar_and_transform_to_native(comp)

  return compile_fn


def _make_context(factory, secure_intrinsics: bool, sync: bool):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation  # pylint: disable=g-import-not-at-top

  cls = tff.framework.SyncExecutionContext if sync else tff.framework.AsyncExecutionContext
  return cls(
      executor_fn=factory,
      compiler_fn=_compiler(secure_intrinsics),
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )


def disarm_default_context() -> None:
  """Makes TFF's import-time default context harmless once we replace it.

  It never started a worker (we install ours first), but its service
  manager's `__del__` runs during interpreter shutdown, when `subprocess` is
  already gone, and prints an AttributeError traceback. Give that one local
  class a no-op `__del__` when its process was never started.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  context = tff.framework.get_context_stack().current
  factory = getattr(context, '_executor_factory', None)
  stack_fn = getattr(factory, '_executor_stack_fn', None)
  for cell in getattr(stack_fn, '__closure__', None) or ():
    manager = cell.cell_contents
    if type(manager).__name__ == 'ServiceManager' and getattr(manager, '_process', 1) is None:
      type(manager).__del__ = lambda self: None


def set_local_context(
    *,
    max_concurrent_computation_calls: int = -1,
    secure_intrinsics: bool = False,
    default_num_clients: int = 0,
    worker_log: Optional[str] = None,
) -> LocalWorker:
  """Installs a sync TFF context on a fresh local C++ worker; returns it.

  Any worker started by an earlier call is stopped first.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  global _installed
  disarm_default_context()
  stop_all_workers()
  worker = LocalWorker(
      max_concurrent_computation_calls=max_concurrent_computation_calls,
      log_path=worker_log,
  ).start()
  factory = _executor_factory(worker.address, worker, default_num_clients)
  tff.framework.set_default_context(_make_context(factory, secure_intrinsics, sync=True))
  _installed = True
  return worker


def set_remote_context(
    addresses: Sequence[str],
    *,
    secure_intrinsics: bool = False,
    default_num_clients: int = 0,
) -> None:
  """Installs TFF's mergeable-computation context over remote workers.

  Each round's clients are split across the workers at `addresses`
  (`host:port` of running `worker_binary` processes).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  global _installed
  if not addresses:
    raise ValueError('set_remote_context needs at least one worker address')
  disarm_default_context()
  contexts = []
  for address in addresses:
    factory = _executor_factory(address, None, default_num_clients)
    contexts.append(_make_context(factory, secure_intrinsics, sync=False))
  tff.framework.set_default_context(
      tff.backends.native.create_mergeable_comp_execution_context(contexts)
  )
  _installed = True


def ensure_context(**kwargs) -> None:
  """Installs the local context unless one of ours is already installed."""
  if not _installed:
    set_local_context(**kwargs)
