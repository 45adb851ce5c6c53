"""A crashed local TFF worker is replaced and training resumes from its checkpoint."""

import sys
import csv
import os
import signal

import pytest

from tff_rec import runtime
from tff_rec.training import algorithms
from tff_rec.training import data_setup
from tff_rec.training import execution
from tff_rec.training import experiment
from tff_rec.training import optimizers
from tff_rec.training import sampling


def _config(root, **kwargs):
  return experiment.FederatedConfig(
      data=data_setup.DataConfig(dataset='synthetic', seed=0),
      model=experiment.ModelConfig('mf', {'embedding_dim': 4}),
      algorithm=algorithms.AlgorithmConfig(
          'fedavg', client_optimizer=optimizers.OptimizerConfig('sgd', 0.1)),
      clients_per_round=8, total_rounds=6, eval_every=100, eval_clients=8)


def _execution(root, **kwargs):
  return execution.ExecutionConfig(root_output_dir=str(root), experiment_name='run',
                                   progress_bar=False, **kwargs)


def test_killed_worker_is_replaced_and_the_run_finishes(tmp_path, monkeypatch):
  killed = []
  original = sampling.ClientSampler.__call__

  def kill_worker_once(self, round_num):
    if round_num == 4 and not killed:
      (worker,) = runtime._live_workers  # pylint: disable=protected-access
      killed.append(worker.process.pid)
      worker.process.send_signal(signal.SIGKILL)
      worker.process.wait()
    return original(self, round_num)

  monkeypatch.setattr(sampling.ClientSampler, '__call__', kill_worker_once)
  result = experiment.run_federated(_config(tmp_path), _execution(tmp_path))

  assert killed
  (worker,) = runtime._live_workers  # pylint: disable=protected-access
  assert worker.alive() and worker.process.pid != killed[0]
  assert os.path.isdir(os.path.join(result.run_dir, 'checkpoints', 'program_state_6'))
  with open(os.path.join(result.run_dir, 'metrics.csv')) as f:
    rounds = [int(row['round_num']) for row in csv.DictReader(f)]
  assert rounds == list(range(7))  # round 4 once, not twice
  assert set(result.test_metrics) >= {'rmse'}


def _raise_worker_error():
  raise runtime.WorkerError('TFF worker at localhost:1 died (exit status -11)')


def test_restarts_are_bounded_and_local_only(tmp_path, monkeypatch):
  installs = []
  monkeypatch.setattr(execution, 'install_runtime', installs.append)
  with pytest.raises(runtime.WorkerError, match='died'):
    execution.train_with_worker_restarts(_execution(tmp_path, worker_restarts=2), _raise_worker_error)
  assert len(installs) == 2
  installs.clear()
  with pytest.raises(runtime.WorkerError):
    execution.train_with_worker_restarts(
        _execution(tmp_path, worker_addresses=('hostA:8000',)), _raise_worker_error)
  assert not installs  # a remote worker is not ours to restart
  calls = []

  def fail_once():
    calls.append(1)
    if len(calls) == 1:
      _raise_worker_error()
    return 'state'

  assert execution.train_with_worker_restarts(_execution(tmp_path), fail_once) == 'state'
  assert len(installs) == 1
  with pytest.raises(ValueError, match='worker_restarts'):
    _execution(tmp_path, worker_restarts=-1)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
