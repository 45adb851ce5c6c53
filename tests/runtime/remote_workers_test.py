"""Training on two TFF workers (loopback): same result as one process, a dead
worker is named, and rerunning the command resumes from the last checkpoint."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import psutil
import pytest

from tests import processes
from tests import shared_data
from tff_rec.training import artifacts

_RUN = ['--dataset=synthetic', '--split=random', '--model=mf', '--embedding_dim=4',
        '--algorithm=fedavg', '--clients_per_round=40', '--total_rounds=3', '--checkpoint_every=1',
        '--eval_every=4', '--client_learning_rate=0.2', '--progress_bar=false', '--seed=3']
_TIMEOUT = 300


def _env():
  # A dead worker is reported after 3s instead of the default 15s.
  return dict(os.environ, PYTHONPATH=shared_data.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL='3',
              TFF_REC_WORKER_TIMEOUT_SEC='3')


class _Worker:
  """`experiments.start_worker` in a subprocess (its worker_binary dies with it)."""

  def __init__(self, port: int):
    self.port = port
    self.address = f'localhost:{port}'
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'experiments.start_worker', f'--port={port}'],
        cwd=shared_data.REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    line = self.proc.stdout.readline()
    assert 'TFF worker ready' in line, f'worker on port {port} did not start: {line!r}'
    self.children = [c.pid for c in psutil.Process(self.proc.pid).children()]

  def stop(self, sig=signal.SIGTERM) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
    self.proc.wait(timeout=30)
    self.proc.stdout.close()
    for pid in self.children:
      assert processes.gone(pid), f'worker_binary {pid} outlived start_worker'


def _train(root, name, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.run_federated', *_RUN, f'--root_output_dir={root}',
       f'--experiment_name={name}', *extra],
      cwd=shared_data.REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _metrics(run_dir):
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    return {int(row['round_num']): row for row in csv.DictReader(f)}


def _final_weights(run_dir):
  rec, _, _, _ = artifacts.load_final_model(run_dir)
  return [v.numpy() for v in rec.keras_model.weights]


@pytest.fixture(scope='module')
def scenario(tmp_path_factory):
  """One process vs two workers, one of which is killed after round 1, then a rerun."""
  root = str(tmp_path_factory.mktemp('remote'))
  ports = [portpicker.pick_unused_port() for _ in range(2)]
  workers = [_Worker(p) for p in ports]
  out = {'root': root, 'dead_address': workers[1].address}
  try:
    flag = f'--workers={",".join(w.address for w in workers)}'
    reference = _train(root, 'one_process')
    remote = _train(root, 'two_workers', flag)
    checkpoint = os.path.join(root, 'two_workers', 'checkpoints', 'program_state_1')
    deadline = time.monotonic() + _TIMEOUT
    while not os.path.isdir(checkpoint):
      assert remote.poll() is None, remote.communicate()[1]
      assert time.monotonic() < deadline, 'no checkpoint from the two-worker run'
      time.sleep(0.05)
    workers[1].stop(signal.SIGKILL)  # Its worker_binary dies with it (PDEATHSIG).
    _, out['failed_stderr'] = remote.communicate(timeout=_TIMEOUT)
    out['failed_code'] = remote.returncode
    out['metrics_before_rerun'] = _metrics(os.path.join(root, 'two_workers'))

    workers[1] = _Worker(ports[1])
    rerun = _train(root, 'two_workers', flag)
    _, out['rerun_stderr'] = rerun.communicate(timeout=_TIMEOUT)
    out['rerun_code'] = rerun.returncode
    _, err = reference.communicate(timeout=_TIMEOUT)
    assert reference.returncode == 0, err
  finally:
    for w in workers:
      w.stop()
  return out


def test_dead_worker_fails_the_run_naming_its_address(scenario):
  assert scenario['failed_code'] != 0
  err = scenario['failed_stderr']
  assert 'WorkerError' in err and f'TFF worker at {scenario["dead_address"]}' in err, err[-3000:]
  assert 'rerun the same command' in err


def test_rerun_resumes_from_the_last_checkpoint(scenario):
  assert scenario['rerun_code'] == 0, scenario['rerun_stderr'][-3000:]
  assert 'from the checkpoint of round' in scenario['rerun_stderr']


def test_two_workers_match_one_process(scenario):
  one = os.path.join(scenario['root'], 'one_process')
  two = os.path.join(scenario['root'], 'two_workers')
  # Rounds the two workers ran before one died, and every round after the rerun.
  for metrics in (scenario['metrics_before_rerun'], _metrics(two)):
    reference = _metrics(one)
    assert metrics
    for round_num, row in metrics.items():
      for key, value in row.items():
        if 'time' in key or not value or not reference[round_num].get(key):
          continue  # Wall-clock timings differ; empty cells are rounds without eval.
        np.testing.assert_allclose(float(value), float(reference[round_num][key]), rtol=1e-4,
                                   atol=1e-6, err_msg=f'round {round_num} {key}')
  for a, b in zip(_final_weights(one), _final_weights(two)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert artifacts.read_json(os.path.join(one, 'test_metrics.json')).keys() == \
      artifacts.read_json(os.path.join(two, 'test_metrics.json')).keys()


@pytest.mark.parametrize('addresses,match', [
    ([], 'at least one'),
    (['localhost'], 'not host:port'),
    (['localhost:http'], 'not host:port'),
    (['a:1', 'a:1'], 'repeat'),
])
def test_bad_worker_addresses_are_rejected(addresses, match):
  from tff_rec import runtime  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    runtime.set_remote_context(addresses)


def test_clients_per_subround_must_be_positive():
  from tff_rec import runtime  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='clients_per_subround'):
    runtime._splitting_context([], False, 0)  # pylint: disable=protected-access


def test_start_worker_refuses_a_busy_port():
  import socket  # pylint: disable=g-import-not-at-top
  from tff_rec import runtime  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
    s.bind(('::', 0))
    s.listen()
    with pytest.raises(runtime.WorkerError, match='already in use'):
      runtime.serve_worker(s.getsockname()[1])


def test_a_frozen_worker_is_reported_after_worker_timeout_sec(tmp_path):
  """A stopped (SIGSTOP) worker keeps its TCP connection: only the liveness probe notices it."""
  ports = [portpicker.pick_unused_port() for _ in range(2)]
  workers = [_Worker(p) for p in ports]
  try:
    run = _train(tmp_path, 'frozen', f'--workers={",".join(w.address for w in workers)}',
                 '--worker_timeout_sec=3', '--total_rounds=500')
    checkpoint = os.path.join(tmp_path, 'frozen', 'checkpoints', 'program_state_1')
    deadline = time.monotonic() + _TIMEOUT
    while not os.path.isdir(checkpoint):
      assert run.poll() is None, run.communicate()[1]
      assert time.monotonic() < deadline, 'no checkpoint from the run'
      time.sleep(0.05)
    for pid in [workers[1].proc.pid, *workers[1].children]:
      os.kill(pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    _, err = run.communicate(timeout=_TIMEOUT)  # Without the probe this would never return.
    waited = time.monotonic() - frozen_at
    assert run.returncode == 1, err[-3000:]
    assert (f'TFF worker at {workers[1].address} stopped answering (no response to a liveness '
            'probe within 3s)') in err, err[-3000:]
    assert 'trusted network' in err  # --workers warns at start
    # 3 s of silence, a probe at most every second, then the process exits;
    # far from the minutes a call to a frozen worker would otherwise wait.
    assert waited < 45, waited
  finally:
    for pid in [workers[1].proc.pid, *workers[1].children]:
      os.kill(pid, signal.SIGCONT)
    for w in workers:
      w.stop()


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
