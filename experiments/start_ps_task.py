"""Runs one worker or parameter-server task of a TF parameter-server cluster.

On each worker and ps host of a cluster, with that task's `TF_CONFIG`:

  TF_CONFIG='{"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"],
              "ps": ["p0:2222", "p1:2222"]}, "task": {"type": "ps", "index": 0}}' \
      python -m experiments.start_ps_task

then `experiments.run_central_distributed --cluster=tf_config` on the chief.
TF's gRPC server listens on every interface without authentication: trusted
networks only. It serves until stopped (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

from typing import Sequence

from absl import app

from tff_rec.distributed import cluster


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    cluster.read_tf_config()
  except cluster.ClusterError as e:
    raise app.UsageError(str(e)) from e
  cluster.serve_task_from_env()


if __name__ == '__main__':
  app.run(main)
