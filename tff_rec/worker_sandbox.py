"""A local TFF worker that nobody else can reach: its own network namespace, a Unix socket.

TFF's `worker_binary` has only a `--port` flag and binds it on every
interface, unauthenticated: anyone who can reach the machine could send it
computations (which read and write files as the user). For the local worker
of a run, `tff_rec.runtime` instead starts this module's `main` under
`unshare --net` (or, without root, `unshare --user --map-root-user --net`):

* the new network namespace has only the loopback interface, which `main`
  brings up; the worker binds its port there, so no other host, and no other
  process outside the namespace, can connect to it;
* the training process reaches it through a Unix-domain socket in a private
  directory (mode 0700, the socket 0600), which `main` forwards to the
  worker's port inside the namespace. Only the same user (or root) can open
  it.

`main` dies with the process that started it (PR_SET_PDEATHSIG, set before
exec and kept across it), and the worker dies with `main`. When the kernel
refuses new namespaces, `runtime` falls back to a TCP port and warns (or
fails if `TFF_REC_REQUIRE_ISOLATED_WORKER=1`).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from typing import Optional

# Environment of `main` (set by `command`).
_ENV_PORT = 'TFF_REC_SANDBOX_PORT'
_ENV_SOCKET = 'TFF_REC_SANDBOX_SOCKET'
_ENV_BINARY = 'TFF_REC_SANDBOX_BINARY'
_ENV_MAX_CALLS = 'TFF_REC_SANDBOX_MAX_CALLS'
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CHUNK = 1 << 20


def _unshare_prefixes() -> list[list[str]]:
  exe = shutil.which('unshare')
  if exe is None:
    return []
  return [[exe, '--net'], [exe, '--user', '--map-root-user', '--net']]


@functools.lru_cache(maxsize=None)
def unshare_prefix() -> Optional[tuple[str, ...]]:
  """The `unshare` command line that works on this machine (None if none does)."""
  for prefix in _unshare_prefixes():
    try:
      done = subprocess.run([*prefix, 'true'], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
      continue
    if done.returncode == 0:
      return tuple(prefix)
  return None


def command(prefix: tuple[str, ...], *, port: int, socket_path: str, binary: str,
            max_concurrent_computation_calls: int) -> tuple[list[str], dict]:
  """(argv, env) that run `main` in a new network namespace."""
  env = dict(os.environ)
  env.update({_ENV_PORT: str(port), _ENV_SOCKET: socket_path, _ENV_BINARY: binary,
              _ENV_MAX_CALLS: str(max_concurrent_computation_calls)})
  code = 'from tff_rec import worker_sandbox; worker_sandbox.main()'
  return [*prefix, sys.executable, '-c', code], env


def _loopback_up() -> None:
  """Brings `lo` up (a new network namespace starts with it down)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH14x', b'lo', 0)
    flags = struct.unpack('16sH14x', fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack('16sH14x', b'lo', flags | _IFF_UP))


def _die_with_parent() -> None:
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    os._exit(127)  # pylint: disable=protected-access
  if os.getppid() == 1:
    os._exit(0)  # pylint: disable=protected-access


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
  try:
    while True:
      data = await reader.read(_CHUNK)
      if not data:
        break
      writer.write(data)
      await writer.drain()
  except (ConnectionError, OSError):
    pass
  finally:
    try:
      writer.close()
    except (ConnectionError, OSError):
      pass


async def _serve(port: int, socket_path: str, worker: subprocess.Popen) -> int:
  async def handle(reader, writer):
    try:
      up_reader, up_writer = await asyncio.open_connection('127.0.0.1', port)
    except OSError:
      writer.close()
      return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

  server = await asyncio.start_unix_server(handle, path=socket_path, limit=_CHUNK)
  os.chmod(socket_path, 0o600)
  async with server:
    while worker.poll() is None:
      await asyncio.sleep(0.2)
  return worker.returncode


def main() -> None:
  """Runs inside the new namespace: loopback up, the worker, the socket forwarder."""
  _die_with_parent()
  port = int(os.environ[_ENV_PORT])
  socket_path = os.environ[_ENV_SOCKET]
  _loopback_up()
  worker = subprocess.Popen(
      [os.environ[_ENV_BINARY], f'--port={port}',
       f'--max_concurrent_computation_calls={os.environ.get(_ENV_MAX_CALLS, "-1")}'],
      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, close_fds=True)

  def stop(signum, frame):  # pylint: disable=unused-argument
    if worker.poll() is None:
      worker.send_signal(signal.SIGINT)
      try:
        worker.wait(timeout=5)
      except subprocess.TimeoutExpired:
        worker.kill()
    os._exit(128 + signum)  # pylint: disable=protected-access

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  code = asyncio.run(_serve(port, socket_path, worker))
  # The worker's status: negative for a signal, as subprocess reports it.
  os._exit(128 - code if code < 0 else code)  # pylint: disable=protected-access
