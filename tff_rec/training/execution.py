"""How and where a federated run executes: outputs, TFF runtime, workers, client storage.

`ExecutionConfig` is the half of a run's configuration that never changes its
result (beyond float summation order): it may differ between a run and its
resumption, and it is left out of table cell hashes. The result-defining half
is `experiment.FederatedConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from absl import logging

from tff_rec import runtime
from tff_rec.training import algorithms


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """The execution-only settings of a federated run.

  Attributes:
    root_output_dir: Where run directories are created.
    experiment_name: The run directory's name under `root_output_dir`.
    checkpoint_every: Save program state every this many rounds.
    progress_bar: Show a progress bar.
    worker_addresses: `host:port` of remote TFF workers (empty: one local
      worker).
    max_concurrent_computation_calls: Local worker concurrency cap (-1: none).
    worker_restarts: Times a crashed local worker is replaced (training then
      resumes from the last checkpoint) before the run fails.
    secure_intrinsics: Execute `federated_secure_sum(_bitwidth)` (distributed
      DP); see `tff_rec.runtime`.
    clients_per_subround: Rounds with more clients run as merged subrounds of
      this many (bounds the worker's memory).
    client_data_dir: Keep each user's training rows in one file here, read
      worker-side, instead of in the dataset computation.
    loop_implementation: Client loop (`algorithms.LOOP_IMPLEMENTATIONS`).
    fedrecon_implementation: FedRecon builder
      (`algorithms.FEDRECON_IMPLEMENTATIONS`).
    allow_config_change: Resume a run directory even if it was trained with a
      different result-defining configuration (results then mix the two).
    max_zeroed_client_share: Stop the run when more than this share of a
      round's clients sent non-finite (zeroed) updates.
    worker_timeout_sec: A remote worker that does not answer a liveness probe
      for this long while a call waits on it is reported dead (`WorkerError`).
  """

  root_output_dir: str = 'runs'
  experiment_name: str = 'federated'
  checkpoint_every: int = 1
  progress_bar: bool = True
  worker_addresses: tuple[str, ...] = ()
  max_concurrent_computation_calls: int = -1
  worker_restarts: int = 2
  secure_intrinsics: bool = False
  clients_per_subround: Optional[int] = 500
  client_data_dir: Optional[str] = None
  loop_implementation: str = 'iterator'
  fedrecon_implementation: str = 'fast'
  allow_config_change: bool = False
  max_zeroed_client_share: float = 0.5
  worker_timeout_sec: float = runtime.WORKER_TIMEOUT_SEC

  def __post_init__(self):
    if not 0.0 <= self.max_zeroed_client_share <= 1.0:
      raise ValueError(f'max_zeroed_client_share must be in [0, 1], got '
                       f'{self.max_zeroed_client_share}')
    if not 0.0 < self.worker_timeout_sec < float('inf'):
      raise ValueError(f'worker_timeout_sec must be positive and finite, got '
                       f'{self.worker_timeout_sec}')
    if self.checkpoint_every <= 0:
      raise ValueError(f'checkpoint_every must be positive, got {self.checkpoint_every}')
    if self.clients_per_subround is not None and self.clients_per_subround <= 0:
      raise ValueError(f'clients_per_subround must be positive, got {self.clients_per_subround}')
    if self.worker_restarts < 0:
      raise ValueError(f'worker_restarts must be >= 0, got {self.worker_restarts}')
    if self.loop_implementation not in algorithms.LOOP_IMPLEMENTATIONS:
      raise ValueError(f'unknown loop_implementation {self.loop_implementation!r}; '
                       f'valid: {", ".join(algorithms.LOOP_IMPLEMENTATIONS)}')
    if self.fedrecon_implementation not in algorithms.FEDRECON_IMPLEMENTATIONS:
      raise ValueError(f'unknown fedrecon_implementation {self.fedrecon_implementation!r}; '
                       f'valid: {", ".join(algorithms.FEDRECON_IMPLEMENTATIONS)}')

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)


def install_runtime(execution: ExecutionConfig) -> None:
  """Sets up TFF's execution context: a local worker, or the remote workers."""
  if execution.worker_addresses:
    logging.warning(
        'Remote TFF workers (%s): their gRPC traffic is neither encrypted nor authenticated, and '
        'a worker runs whatever computation it is sent. Use them on a trusted network only '
        '(or through SSH tunnels); see the README, "Security".', ','.join(execution.worker_addresses))
    runtime.set_remote_context(list(execution.worker_addresses),
                               secure_intrinsics=execution.secure_intrinsics,
                               clients_per_subround=execution.clients_per_subround,
                               worker_timeout_sec=execution.worker_timeout_sec)
  else:
    runtime.set_local_context(
        max_concurrent_computation_calls=execution.max_concurrent_computation_calls,
        secure_intrinsics=execution.secure_intrinsics,
        clients_per_subround=execution.clients_per_subround)


def train_with_worker_restarts(execution: ExecutionConfig, train: Callable[[], Any]) -> Any:
  """`train()`; if the local worker dies, a new one and `train()` again (it resumes).

  TFF's C++ worker can crash in long runs (e.g. a segfault in its gRPC
  server); `train` resumes from the run's latest checkpoint, so a fresh
  worker loses at most `checkpoint_every` rounds. Remote workers are never
  replaced.
  """
  for attempt in range(execution.worker_restarts + 1):
    try:
      return train()
    except runtime.WorkerError as e:
      if execution.worker_addresses or attempt == execution.worker_restarts:
        raise
      logging.warning('%s. Starting a new local worker and resuming from the last checkpoint '
                      '(restart %d of at most %d).', e, attempt + 1, execution.worker_restarts)
      install_runtime(execution)
