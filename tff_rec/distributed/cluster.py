"""Clusters for TensorFlow's parameter-server training: task servers and a loopback launcher.

A cluster has one chief (the process that runs the training program, TF's
"coordinator"), workers that execute the training steps, and parameter
servers (ps) that hold the variables, each shard of a partitioned table on
one ps. Every worker and ps runs TF's own gRPC server (`tf.distribute.Server`).

* On a real cluster, start each worker and ps with `TF_CONFIG` set
  (`experiments/start_ps_task.py` calls `serve_task_from_env`), and run the
  training binary on the chief with its own `TF_CONFIG` (task type `chief`).
* `LoopbackCluster` starts that cluster on this machine: the workers and
  parameter servers are separate Python processes, each bound to its own
  localhost port, and this process is the chief. Every child sets
  `PR_SET_PDEATHSIG` itself, first thing, so that the kernel kills it when
  the chief dies, even by SIGKILL, and exits at once if the chief is already
  gone; the launcher also stops them on exit, on SIGTERM and on errors.

TF's servers speak plain gRPC without authentication or encryption, and
`tf.distribute.Server` listens on every interface: run clusters on a trusted
network only (see the README's security section).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from absl import logging
import portpicker

TASK_TYPES = ('chief', 'worker', 'ps')
_PR_SET_PDEATHSIG = 1
# The chief's pid, for children to check that it is still alive.
PARENT_PID_ENV = 'TFF_REC_CLUSTER_PARENT_PID'
_STARTUP_TIMEOUT_SEC = 120.0


class ClusterError(RuntimeError):
  """A cluster that cannot be started, read from TF_CONFIG, or reached."""


def tf_config(cluster: dict, task_type: str, task_index: int) -> str:
  """The `TF_CONFIG` JSON of one task of `cluster` ({'worker': [host:port, ...], ...})."""
  if task_type not in TASK_TYPES:
    raise ClusterError(f'unknown task type {task_type!r}; valid: {", ".join(TASK_TYPES)}')
  if not 0 <= task_index < len(cluster.get(task_type, ())):
    raise ClusterError(f'task {task_type}:{task_index} is not in the cluster {cluster}')
  return json.dumps({'cluster': cluster, 'task': {'type': task_type, 'index': task_index}})


def read_tf_config(environ=None) -> tuple[dict, str, int]:
  """(cluster, task type, task index) from `TF_CONFIG`; ClusterError naming what is wrong."""
  environ = os.environ if environ is None else environ
  raw = environ.get('TF_CONFIG')
  if not raw:
    raise ClusterError('TF_CONFIG is not set; it must hold {"cluster": {...}, "task": {...}}')
  try:
    config = json.loads(raw)
    cluster = config['cluster']
    task_type = config['task']['type']
    task_index = int(config['task']['index'])
  except (ValueError, KeyError, TypeError) as e:
    raise ClusterError(f'TF_CONFIG is not valid: {e!r} in {raw!r}') from None
  for kind in ('worker', 'ps'):
    if not cluster.get(kind):
      raise ClusterError(f'TF_CONFIG: the cluster has no {kind} tasks: {cluster}')
  tf_config(cluster, task_type, task_index)  # Validates the task.
  return cluster, task_type, task_index


def _die_with_parent(parent_pid: Optional[int]) -> None:
  """In a child: have the kernel SIGKILL us when the parent dies; exit if it already has."""
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    raise ClusterError(f'prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}')
  if parent_pid is not None and os.getppid() != parent_pid:
    os._exit(0)  # pylint: disable=protected-access


def serve_task_from_env() -> None:
  """Runs this process's worker or ps server (from `TF_CONFIG`) until killed.

  When started by `LoopbackCluster` (`TFF_REC_CLUSTER_PARENT_PID` set), the
  server dies with its chief.
  """
  parent = os.environ.get(PARENT_PID_ENV)
  if parent:
    _die_with_parent(int(parent))
  cluster, task_type, task_index = read_tf_config()
  if task_type not in ('worker', 'ps'):
    raise ClusterError(f'serve_task_from_env runs worker and ps tasks, not {task_type!r} '
                       '(the chief runs the training binary)')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  server = tf.distribute.Server(
      tf.train.ClusterSpec(cluster), job_name=task_type, task_index=task_index,
      protocol='grpc', start=True)
  logging.info('TF %s task %d serving at %s', task_type, task_index, server.target)
  server.join()


def _port_open(address: str) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host, int(port)), timeout=0.5):
      return True
  except OSError:
    return False


_live: list['LoopbackCluster'] = []
_hooks = False


def _stop_all() -> None:
  for cluster in list(_live):
    cluster.stop()


def _install_hooks() -> None:
  global _hooks
  if _hooks:
    return
  _hooks = True
  atexit.register(_stop_all)
  if threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      def on_term(signum, frame):  # pylint: disable=unused-argument
        _stop_all()
        raise SystemExit(128 + signum)
      signal.signal(signal.SIGTERM, on_term)


class LoopbackCluster:
  """A chief (this process), workers and parameter servers on localhost.

  Use as a context manager; `resolver()` is the chief's cluster resolver for
  `tf.distribute.ParameterServerStrategy`, `pids` the children's process ids.
  """

  def __init__(self, num_workers: int = 2, num_ps: int = 2, log_dir: Optional[str] = None):
    if num_workers < 1 or num_ps < 1:
      raise ClusterError(f'a cluster needs at least one worker and one ps, got '
                         f'{num_workers} workers and {num_ps} ps')
    self.num_workers = num_workers
    self.num_ps = num_ps
    self.log_dir = log_dir
    self.cluster: dict = {}
    self.processes: dict[str, subprocess.Popen] = {}
    self.addresses: dict[str, str] = {}

  @property
  def pids(self) -> dict[str, int]:
    return {name: p.pid for name, p in self.processes.items()}

  def start(self) -> 'LoopbackCluster':
    """Starts the children and waits until every server accepts connections."""
    if threading.current_thread() is not threading.main_thread():
      raise ClusterError('start a LoopbackCluster from the main thread (PDEATHSIG is per thread)')
    ports = [portpicker.pick_unused_port() for _ in range(1 + self.num_workers + self.num_ps)]
    self.cluster = {
        'chief': [f'localhost:{ports[0]}'],
        'worker': [f'localhost:{p}' for p in ports[1:1 + self.num_workers]],
        'ps': [f'localhost:{p}' for p in ports[1 + self.num_workers:]],
    }
    _live.append(self)
    _install_hooks()
    try:
      for kind in ('ps', 'worker'):
        for index in range(len(self.cluster[kind])):
          self._spawn(kind, index)
      self._wait_ready()
    except BaseException:
      self.stop()
      raise
    logging.info('Loopback cluster up: %s', self.cluster)
    return self

  def _spawn(self, kind: str, index: int) -> None:
    env = dict(os.environ, TF_CONFIG=tf_config(self.cluster, kind, index),
               **{PARENT_PID_ENV: str(os.getpid())})
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    out = subprocess.DEVNULL
    if self.log_dir:
      os.makedirs(self.log_dir, exist_ok=True)
      out = open(os.path.join(self.log_dir, f'{kind}{index}.log'), 'ab')
    name = f'{kind}{index}'
    self.addresses[name] = self.cluster[kind][index]
    try:
      self.processes[name] = subprocess.Popen(
          [sys.executable, '-c',
           'from tff_rec.distributed import cluster; cluster.serve_task_from_env()'],
          env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
          start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
              os.path.abspath(__file__)))))
    finally:
      if out is not subprocess.DEVNULL:
        out.close()

  def _wait_ready(self) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SEC
    pending = dict(self.addresses)
    while pending:
      for name, address in list(pending.items()):
        proc = self.processes[name]
        if proc.poll() is not None:
          raise ClusterError(f'{name} ({address}) exited with status {proc.returncode} during '
                             f'start-up' + (f'; see {self.log_dir}/{name}.log' if self.log_dir else ''))
        if _port_open(address):
          del pending[name]
      if time.monotonic() > deadline:
        raise ClusterError(f'not ready after {_STARTUP_TIMEOUT_SEC:.0f}s: {", ".join(pending)}')
      time.sleep(0.2)

  def resolver(self):
    """The chief's `SimpleClusterResolver` over this cluster."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(self.cluster), task_type='chief', task_id=0, rpc_layer='grpc')

  def alive(self) -> dict[str, bool]:
    return {name: p.poll() is None for name, p in self.processes.items()}

  def stop(self, timeout: float = 5.0) -> None:
    """Stops every child: SIGTERM, then SIGKILL after `timeout` seconds."""
    for proc in self.processes.values():
      if proc.poll() is None:
        try:
          proc.terminate()
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + timeout
    for proc in self.processes.values():
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if self in _live:
      _live.remove(self)

  def __enter__(self) -> 'LoopbackCluster':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def resolver_from_env():
  """The chief's cluster resolver from `TF_CONFIG` (task type must be `chief`)."""
  cluster, task_type, task_index = read_tf_config()
  if task_type != 'chief':
    raise ClusterError(f'the training binary runs as the chief; TF_CONFIG says {task_type}:{task_index}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster), task_type='chief', task_id=task_index, rpc_layer='grpc')
