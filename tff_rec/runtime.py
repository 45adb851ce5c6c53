"""TFF execution contexts whose C++ worker processes never outlive us.

TFF's default context starts a `worker_binary` subprocess that is left running
after Python exits. Here we start the worker ourselves, in a new session, with
`PR_SET_PDEATHSIG=SIGKILL` (the kernel kills it when we die, even by SIGKILL),
and stop it from `atexit` and on SIGTERM. Contexts talk to workers through
TFF's own `RemoteExecutor`; remote workers (`host:port`) are combined with
TFF's mergeable-computation execution context, which splits each call's
clients into subrounds across the workers and merges their partial
aggregates (`SplittingContext`). The same context over one local worker runs
a large round in bounded memory (`clients_per_subround`).

A worker that dies or stops answering makes the current call fail with a
`WorkerError` naming its address; training loops checkpoint every round, so
rerunning the same command resumes.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import math
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

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
# A worker that does not answer a liveness probe (a fresh gRPC connection
# completing its HTTP/2 handshake) for this long while a call waits on it, or
# (re)connection attempts after a failed call, is reported dead. TFF itself
# would wait forever on a frozen worker or a silent network. `--worker_timeout_sec`
# sets it per run; the environment variable TFF_REC_WORKER_TIMEOUT_SEC sets
# the default.
WORKER_TIMEOUT_SEC = float(os.environ.get('TFF_REC_WORKER_TIMEOUT_SEC', '15'))
# While a call waits, the worker is probed this often (at most).
_PROBE_EVERY_SEC = 5.0

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
  """A TFF C++ `worker_binary` child process bound to this process's life.

  With `isolate` (the default where the kernel allows it), the worker runs in
  its own network namespace and is reached through a private Unix socket
  (`tff_rec.worker_sandbox`): no other host or user can send it computations.
  Without it, the worker listens on a TCP port on every interface (what
  remote workers, `serve_worker`, need).
  """

  def __init__(
      self,
      port: Optional[int] = None,
      max_concurrent_computation_calls: int = -1,
      log_path: Optional[str] = None,
      isolate: Optional[bool] = None,
  ):
    self.port = port or portpicker.pick_unused_port()
    self.max_concurrent_computation_calls = max_concurrent_computation_calls
    self.log_path = log_path
    self.isolate = isolate
    self.process: Optional[subprocess.Popen] = None
    self._socket_dir: Optional[str] = None

  @property
  def isolated(self) -> bool:
    return self._socket_dir is not None

  @property
  def address(self) -> str:
    """The gRPC target: `unix:<socket>` when isolated, else `localhost:<port>`."""
    if self._socket_dir is not None:
      return f'unix:{os.path.join(self._socket_dir, "worker.sock")}'
    return f'localhost:{self.port}'

  @property
  def worker_pid(self) -> Optional[int]:
    """The pid of `worker_binary` itself (a child of the sandbox process when isolated)."""
    if self.process is None:
      return None
    if not self.isolated:
      return self.process.pid
    try:
      import psutil  # pylint: disable=g-import-not-at-top
      children = psutil.Process(self.process.pid).children()
      return children[0].pid if children else None
    except Exception:  # pylint: disable=broad-except
      return None

  def _argv_env(self) -> tuple[list[str], Optional[dict]]:
    from tff_rec import worker_sandbox  # pylint: disable=g-import-not-at-top

    plain = [worker_binary_path(), f'--port={self.port}',
             f'--max_concurrent_computation_calls={self.max_concurrent_computation_calls}']
    if self.isolate is False:
      return plain, None
    prefix = worker_sandbox.unshare_prefix()
    if prefix is None:
      message = ('cannot isolate the local TFF worker in a network namespace (`unshare --net` is '
                 'not permitted here); it listens on TCP port %d on every interface, reachable '
                 'by anyone on the network' % self.port)
      if self.isolate or os.environ.get('TFF_REC_REQUIRE_ISOLATED_WORKER') == '1':
        raise WorkerError(message)
      logging.warning('%s. Set TFF_REC_REQUIRE_ISOLATED_WORKER=1 to refuse to run instead.',
                      message)
      return plain, None
    self._socket_dir = tempfile.mkdtemp(prefix='tff_rec_worker_')
    os.chmod(self._socket_dir, 0o700)
    return worker_sandbox.command(
        prefix, port=self.port, socket_path=self.address[len('unix:'):],
        binary=worker_binary_path(),
        max_concurrent_computation_calls=self.max_concurrent_computation_calls)

  def start(self) -> 'LocalWorker':
    """Starts the worker (from the calling thread) and registers its cleanup."""
    if threading.current_thread() is not threading.main_thread():
      # PDEATHSIG fires when the *thread* that forked exits.
      raise WorkerError('start TFF workers from the main thread')
    argv, env = self._argv_env()
    out = open(self.log_path, 'ab') if self.log_path else subprocess.DEVNULL
    try:
      self.process = subprocess.Popen(
          argv,
          env=env,
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
    logging.info('Started TFF worker pid %d at %s', self.process.pid, self.address)
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
    if self._socket_dir is not None:
      shutil.rmtree(self._socket_dir, ignore_errors=True)


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


class _Liveness:
  """Probes a worker with fresh connections; shared by all calls to it.

  A frozen worker process (or a host behind a silent network) keeps its TCP
  connection open, so a gRPC call to it never fails by itself. A new
  connection needs the worker's gRPC server to answer the HTTP/2 handshake,
  which it cannot do when stopped or unreachable.
  """

  def __init__(self, address: str, timeout_sec: float):
    self.address = address
    self.timeout_sec = timeout_sec
    self._lock = threading.Lock()
    self._last_ok = time.monotonic()
    self.dead = False  # Once dead, stays dead: later calls (e.g. clean-up) fail at once.
    self.reason = (f'stopped answering (no response to a liveness probe within '
                   f'{timeout_sec:g}s)')

  def answers(self) -> bool:
    """Whether the worker answered a probe within `timeout_sec` (recent answers count)."""
    with self._lock:
      if self.dead:
        return False
      if time.monotonic() - self._last_ok < min(_PROBE_EVERY_SEC, self.timeout_sec / 3):
        return True
      channel = grpc.insecure_channel(self.address)
      try:
        grpc.channel_ready_future(channel).result(timeout=self.timeout_sec)
      except grpc.FutureTimeoutError:
        self.dead = True
        return False
      finally:
        channel.close()
      self._last_ok = time.monotonic()
      return True


class _WatchedRpcs:
  """The worker's gRPC stub, with every call abandoned once the worker stops answering."""

  def __init__(self, stub, liveness: _Liveness, dead: Callable[[str], Exception]):
    self._stub = stub
    self._liveness = liveness
    self._dead = dead

  def __getattr__(self, name):
    rpc = getattr(self._stub, name)
    liveness, dead = self._liveness, self._dead

    def call(request):
      if liveness.dead:
        raise dead(liveness.reason)
      future = rpc.future(request)
      poll = min(_PROBE_EVERY_SEC, liveness.timeout_sec / 3)
      while True:
        try:
          return future.result(timeout=poll)
        except grpc.FutureTimeoutError:
          pass
        if not liveness.answers() and not future.done():
          future.cancel()
          raise dead(liveness.reason)

    return call


def _executor_factory(
    address: str,
    worker: Optional[LocalWorker],
    default_num_clients: int,
    worker_timeout_sec: Optional[float] = None,
):
  """A TFF executor factory sending everything to the worker at `address`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.types import placements  # pylint: disable=g-import-not-at-top

  if worker_timeout_sec is None:
    worker_timeout_sec = WORKER_TIMEOUT_SEC
  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  _wait_ready(stub, address, worker)

  def dead(reason: str) -> WorkerError:
    return WorkerError(
        f'TFF worker at {address} {reason}; restart it (or drop it from --workers) and rerun '
        'the same command to resume from the last checkpoint'
    )

  if worker is None:  # A remote worker; a local one's death breaks the connection at once.
    # pylint: disable-next=protected-access
    stub._stub = _WatchedRpcs(stub._stub, _Liveness(address, worker_timeout_sec), dead)

  def stack_fn(cardinalities):
    # Called for a new executor: first use, or TFF's retry after a failed call.
    if worker is not None and not worker.alive():
      raise dead(f'died (exit status {worker.process.returncode})')
    try:
      grpc.channel_ready_future(channel).result(timeout=worker_timeout_sec)
    except grpc.FutureTimeoutError:
      raise dead(f'is unreachable (no connection within {worker_timeout_sec:.0f}s)') from None
    if cardinalities.get(placements.CLIENTS) is None:
      cardinalities[placements.CLIENTS] = default_num_clients
    ex = tff.framework.RemoteExecutor(stub)
    try:
      ex.set_cardinalities(cardinalities)
    except grpc.RpcError as e:
      code = e.code().name if isinstance(e, grpc.Call) else type(e).__name__
      raise dead(f'failed ({code})') from e
    return ex

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _lower_secure_intrinsics(comp):
  """TFF's test backend lowering of federated_secure_sum(_bitwidth) to exact sum bodies.

  TFF rebuilds the computation from its proto and so drops the Python
  containers of its type (a `LearningProcessOutput` came back as an
  OrderedDict); they are put back here.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.computation import computation_impl  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.context_stack import context_stack_impl  # pylint: disable=g-import-not-at-top

  lowered = tff.backends.test.replace_secure_intrinsics_with_bodies(comp)
  return computation_impl.ConcreteComputation(
      computation_proto=lowered.to_compiled_building_block().proto,
      context_stack=context_stack_impl.context_stack,
      annotated_type=comp.type_signature)


def _compiler(secure_intrinsics: bool):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if not secure_intrinsics:
    return tff.backends.native.desugar_and_transform_to_native

  def compile_fn(comp):
    # The C++ runtime has no secure-sum kernels: lower them to exact sums.
    return tff.backends.native.desugar_and_transform_to_native(_lower_secure_intrinsics(comp))

  return compile_fn


def _mergeable_compiler(secure_intrinsics: bool):
  """TFF's compiler to `MergeableCompForm` (secure sums lowered first)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler  # pylint: disable=g-import-not-at-top

  if not secure_intrinsics:
    return mergeable_comp_compiler.compile_to_mergeable_comp_form

  def compile_fn(comp):
    return mergeable_comp_compiler.compile_to_mergeable_comp_form(_lower_secure_intrinsics(comp))

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


def serve_worker(
    port: int,
    *,
    max_concurrent_computation_calls: int = -1,
    log_path: Optional[str] = None,
    on_ready: Optional[Callable[[LocalWorker], None]] = None,
    poll_sec: float = 0.5,
) -> int:
  """Runs a worker on `port` until it exits or we are stopped; its exit status.

  The worker dies with this process (see `LocalWorker`); SIGTERM and SIGINT
  stop it. `on_ready` is called once it accepts connections.
  """
  # gRPC binds with SO_REUSEPORT, so a second worker on a busy port would
  # silently share it; refuse instead.
  if not portpicker.is_port_free(port):
    raise WorkerError(f'port {port} is already in use')
  worker = LocalWorker(port=port, max_concurrent_computation_calls=max_concurrent_computation_calls,
                       log_path=log_path, isolate=False).start()
  try:
    channel = grpc.insecure_channel(worker.address, _GRPC_OPTIONS)
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SEC
    while True:
      if not worker.alive():
        raise WorkerError(f'TFF worker on port {port} exited with status '
                          f'{worker.process.returncode} during start-up')
      try:
        grpc.channel_ready_future(channel).result(timeout=0.5)
        break
      except grpc.FutureTimeoutError:
        if time.monotonic() > deadline:
          raise WorkerError(f'TFF worker on port {port} not ready after {_STARTUP_TIMEOUT_SEC:.0f}s') from None
    channel.close()
    if on_ready is not None:
      on_ready(worker)
    while worker.alive():
      time.sleep(poll_sec)
    return worker.process.returncode
  finally:
    worker.stop()


def _splitting_context_class():
  """`SplittingContext`, defined lazily (TFF is imported on first use)."""
  from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mergeable  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.executors import cardinalities_utils  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.types import placements  # pylint: disable=g-import-not-at-top

  class SplittingContext(mergeable.MergeableCompExecutionContext):
    """TFF's mergeable-computation context, with bounded subrounds and a fallback.

    A computation with one logical aggregation (a training round, an
    evaluation) is compiled by TFF into `up_to_merge` / `merge` /
    `after_merge`; its clients are split into subrounds of at most
    `max_clients_per_subround` (and at least one per worker), run on the
    workers in parallel (extra subrounds queue), and the partial aggregates
    are merged on a worker. A computation TFF cannot split (two dependent
    aggregations) runs whole on `fallback` (the first worker).
    """

    def __init__(self, async_contexts, fallback, compiler_fn, transform_result,
                 max_clients_per_subround: Optional[int]):
      super().__init__(async_contexts, compiler_fn=compiler_fn, transform_result=transform_result)
      self._fallback = fallback
      self._max_clients = max_clients_per_subround
      self._unsplittable = set()

    def invoke(self, comp, arg=None):
      if isinstance(comp, mergeable.MergeableCompForm):
        return super().invoke(comp, arg)
      if id(comp) in self._unsplittable:
        return self._fallback.invoke(comp, arg)
      try:
        form = self._compiler_pipeline.compile(comp)
      except (ValueError, TypeError) as e:
        self._unsplittable.add(id(comp))
        logging.warning('A computation TFF cannot split into subrounds runs whole on the first '
                        'worker: %s', e)
        return self._fallback.invoke(comp, arg)
      subrounds = len(self._async_execution_contexts)
      if arg is not None and self._max_clients:
        clients = cardinalities_utils.infer_cardinalities(
            arg, form.up_to_merge.type_signature.parameter).get(placements.CLIENTS, 0)
        subrounds = max(subrounds, math.ceil(clients / self._max_clients))
      if subrounds == 1:
        # One worker, one subround: the plain call is the same, minus the merge steps.
        return self._fallback.invoke(comp, arg)
      self._num_subrounds = subrounds
      return super().invoke(form, arg)

  return SplittingContext


def _splitting_context(
    make_factories: Sequence[Callable[[], Any]],
    secure_intrinsics: bool,
    clients_per_subround: Optional[int],
):
  """A `SplittingContext` over one async context per worker (factory maker)."""
  from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation  # pylint: disable=g-import-not-at-top

  if clients_per_subround is not None and clients_per_subround <= 0:
    raise ValueError(f'clients_per_subround must be positive, got {clients_per_subround}')
  contexts = [_make_context(make(), secure_intrinsics, sync=False) for make in make_factories]
  # The fallback has its own channel and executors (its own event loop).
  fallback = _make_context(make_factories[0](), secure_intrinsics, sync=True)
  return _splitting_context_class()(
      contexts, fallback, _mergeable_compiler(secure_intrinsics),
      tensorflow_computation.transform_result, clients_per_subround)


def set_local_context(
    *,
    max_concurrent_computation_calls: int = -1,
    secure_intrinsics: bool = False,
    default_num_clients: int = 0,
    worker_log: Optional[str] = None,
    clients_per_subround: Optional[int] = None,
) -> LocalWorker:
  """Installs a sync TFF context on a fresh local C++ worker; returns it.

  Any worker started by an earlier call is stopped first. With
  `clients_per_subround`, rounds with more clients run as sequential
  subrounds of at most that many clients whose aggregates are merged
  (`SplittingContext`): same results up to float summation order, with the
  worker's memory bounded by one subround.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  global _installed
  disarm_default_context()
  stop_all_workers()
  worker = LocalWorker(
      max_concurrent_computation_calls=max_concurrent_computation_calls,
      log_path=worker_log,
  ).start()
  make_factory = lambda: _executor_factory(worker.address, worker, default_num_clients)
  if clients_per_subround is None:
    context = _make_context(make_factory(), secure_intrinsics, sync=True)
  else:
    context = _splitting_context([make_factory], secure_intrinsics, clients_per_subround)
  tff.framework.set_default_context(context)
  _installed = True
  return worker


def set_remote_context(
    addresses: Sequence[str],
    *,
    secure_intrinsics: bool = False,
    default_num_clients: int = 0,
    clients_per_subround: Optional[int] = None,
    worker_timeout_sec: Optional[float] = None,
) -> None:
  """Installs TFF's mergeable-computation context over remote workers.

  Each call's clients are split across the workers at `addresses`
  (`host:port` of running `worker_binary` processes, e.g. started with
  `experiments/start_worker.py`), in subrounds of at most
  `clients_per_subround` clients if given. A worker that is unreachable for
  `worker_timeout_sec` (default `WORKER_TIMEOUT_SEC`) fails the call with a
  `WorkerError` naming it.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  global _installed
  addresses = [a.strip() for a in addresses if a.strip()]
  if not addresses:
    raise ValueError('set_remote_context needs at least one worker address')
  for address in addresses:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
      raise ValueError(f'worker address {address!r} is not host:port')
  if len(set(addresses)) != len(addresses):
    raise ValueError(f'worker addresses repeat: {",".join(addresses)}')
  disarm_default_context()
  makers = [
      functools.partial(_executor_factory, a, None, default_num_clients, worker_timeout_sec)
      for a in addresses
  ]
  tff.framework.set_default_context(
      _splitting_context(makers, secure_intrinsics, clients_per_subround))
  _installed = True


def ensure_context(**kwargs) -> None:
  """Installs the local context unless one of ours is already installed."""
  if not _installed:
    set_local_context(**kwargs)
