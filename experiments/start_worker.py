"""Starts a TFF C++ worker (`worker_binary`) for runs with `--workers`.

Run one (or more, on different ports) per machine, then point the training
binary at them:

  python -m experiments.start_worker --port=8000          # on each host
  python -m experiments.run_federated --workers=hostA:8000,hostB:8000 ...

The worker listens on all interfaces, unencrypted and unauthenticated: use it
on a trusted network only. It stops with this process (Ctrl-C, SIGTERM, or
even SIGKILL); if the worker dies, this exits with its status.
"""

from __future__ import annotations

import socket
from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags

from tff_rec import runtime

FLAGS = flags.FLAGS

flags.DEFINE_integer('port', None, 'Port the worker listens on (all interfaces).', lower_bound=1,
                     upper_bound=65535)
flags.DEFINE_integer('max_concurrent_computation_calls', -1,
                     'Cap on parallel client computations in this worker (-1: none).')
flags.DEFINE_string('worker_log', None, 'Append the worker\'s own output to this file.')
flags.mark_flag_as_required('port')


def ready_message(port: int, pid: int) -> str:
  """The line printed once the worker accepts connections."""
  return f'TFF worker ready at {socket.gethostname()}:{port} (pid {pid}); Ctrl-C stops it'


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    return runtime.serve_worker(
        FLAGS.port,
        max_concurrent_computation_calls=FLAGS.max_concurrent_computation_calls,
        log_path=FLAGS.worker_log,
        on_ready=lambda w: print(ready_message(w.port, w.process.pid), flush=True),
    )
  except runtime.WorkerError as e:
    raise app.UsageError(f'--port={FLAGS.port}: {e}') from e


if __name__ == '__main__':
  common_flags.run(main)
