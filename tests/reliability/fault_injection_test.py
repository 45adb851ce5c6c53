"""Fault injection: nothing is lost, and the next run resumes or refuses clearly.

Each case damages a run on purpose (a kill -9 at a random point, a truncated
or bit-flipped checkpoint, a full disk, a second run into the same
directory, diverging updates, a changed configuration) and checks that the
last good checkpoint and results are intact and that the next run either
resumes to the same model as an undisturbed run or stops with a message
naming the problem.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests import processes
from tests import shared_data
from tff_rec import atomic
from tff_rec.training import artifacts
from tff_rec.training import checkpoints

_RUN = ['--dataset=synthetic', '--split=random', '--model=mf', '--embedding_dim=4',
        '--algorithm=fedrecon', '--reconstruction=closed_form', '--clients_per_round=40',
        '--total_rounds=5', '--checkpoint_every=1', '--eval_every=5',
        '--client_learning_rate=0.2', '--progress_bar=false', '--seed=3']


def _binary(*argv, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'experiments.run_federated', *argv],
                          cwd=shared_data.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def _run(*argv, timeout=900):
  proc = _binary(*argv)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _weights(run_dir):
  rec, _, _, _ = artifacts.load_final_model(run_dir)
  return [v.numpy() for v in rec.keras_model.weights]


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """An undisturbed run directory: what every recovered run must end with."""
  root = tmp_path_factory.mktemp('reference')
  code, _, err = _run(*_RUN, f'--root_output_dir={root}', '--experiment_name=straight')
  assert code == 0, err
  return os.path.join(root, 'straight')


@pytest.fixture(scope='module')
def reference(reference_run):
  return _weights(reference_run)


def _assert_same(reference, run_dir):
  for a, b in zip(reference, _weights(run_dir)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _wait_for(path, proc, timeout=900):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stderr.read()
    assert time.monotonic() < deadline, f'{path} never appeared'
    time.sleep(0.05)


def _checkpoint(run_dir, round_num):
  return os.path.join(run_dir, 'checkpoints', f'program_state_{round_num}')


@pytest.mark.slow
def test_kill_9_at_a_random_point_of_training_then_resume(tmp_path, reference):
  run_dir = os.path.join(tmp_path, 'killed')
  proc = _binary(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=killed')
  _wait_for(_checkpoint(run_dir, 1), proc)
  time.sleep(random.Random(7).uniform(0.0, 2.0))  # Somewhere in rounds 2-5 (saves included).
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, _, err = _run(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=killed')
  assert code == 0, err
  _assert_same(reference, run_dir)


def _export(run_dir, export_base, *extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.compress_and_export', f'--run_dir={run_dir}',
       f'--export_base={export_base}', '--model_name=m', '--report=false', *extra],
      cwd=shared_data.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


@pytest.mark.slow
def test_kill_9_at_a_random_point_of_export_then_export_again(tmp_path, reference_run):
  export_base = str(tmp_path / 'exports')
  model_dir = os.path.join(export_base, 'm')
  first = _export(reference_run, export_base, '--version=1')
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err
  with open(os.path.join(model_dir, '1', 'saved_model.pb'), 'rb') as f:
    version_1 = f.read()
  # Replace version 1 and add version 2, each killed part-way (while writing its files).
  for extra in (['--version=1', '--overwrite'], ['--version=2']):
    proc = _export(reference_run, export_base, *extra)
    deadline = time.monotonic() + 600
    while not any(n.startswith('.tmp-') for n in os.listdir(model_dir)):
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.01)
    time.sleep(random.Random(len(extra)).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    # TF Serving would see the old version 1 intact, or (if the rename had
    # finished) a complete new one; never a partial directory as a version.
    versions = [n for n in os.listdir(model_dir) if n.isdigit()]
    assert '1' in versions
    for v in versions:
      assert os.path.exists(os.path.join(model_dir, v, 'saved_model.pb'))
  # The next export cleans up what the killed ones left and lists only real versions.
  again = _export(reference_run, export_base, '--version=2', '--overwrite')
  _, err = again.communicate(timeout=600)
  assert again.returncode == 0, err
  names = os.listdir(model_dir)
  assert sorted(n for n in names if n.isdigit()) == ['1', '2']
  assert not [n for n in names if n.startswith('.')], names  # no .tmp-* / .old-* left
  with open(os.path.join(model_dir, '1', 'saved_model.pb'), 'rb') as f:
    assert len(f.read()) == len(version_1)
  check = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), 'saved_model_cli'), 'show', '--dir',
       os.path.join(model_dir, '2'), '--tag_set', 'serve'],
      capture_output=True, text=True, timeout=300)
  assert check.returncode == 0 and 'recommend_from_history' in check.stdout, check.stderr


@pytest.mark.slow
@pytest.mark.parametrize('harm', ['truncate', 'bit_flip'])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference, harm):
  run_dir = os.path.join(tmp_path, harm)
  partial = [*_RUN[:-4], '--total_rounds=3', *_RUN[-3:]]
  code, _, err = _run(*partial, f'--root_output_dir={tmp_path}', f'--experiment_name={harm}')
  assert code == 0, err
  data = os.path.join(_checkpoint(run_dir, 3), 'variables', 'variables.data-00000-of-00001')
  size = os.path.getsize(data)
  with open(data, 'r+b') as f:
    if harm == 'truncate':
      f.truncate(size // 2)
    else:
      f.seek(size // 3)
      byte = f.read(1)
      f.seek(size // 3)
      f.write(bytes([byte[0] ^ 0x10]))
  assert checkpoints.damage(_checkpoint(run_dir, 3)) is not None
  code, _, err = _run(*_RUN, f'--root_output_dir={tmp_path}', f'--experiment_name={harm}')
  assert code == 0, err
  assert 'Checkpoint of round 3 is damaged' in err and 'resumes from round 2' in err
  _assert_same(reference, run_dir)
  assert os.listdir(os.path.join(run_dir, 'checkpoints', 'incomplete'))


def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint(tmp_path):
  """ENOSPC injected into the third checkpoint's save (a tmpfs needs privileges CI may lack)."""
  script = f'''
import errno, sys
from tff_rec.training import checkpoints
real = checkpoints.write_manifest
def full_disk(path):
  if path.endswith('program_state_3'):
    raise OSError(errno.ENOSPC, 'No space left on device', path)
  return real(path)
checkpoints.write_manifest = full_disk
from experiments import run_federated
from experiments import common_flags
sys.argv = ['run_federated'] + {_RUN!r} + ['--root_output_dir={tmp_path}', '--experiment_name=full']
common_flags.run(run_federated.main)
'''
  proc = subprocess.run([sys.executable, '-c', script], cwd=shared_data.REPO_ROOT,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode != 0
  assert 'No space left on device' in proc.stderr
  run_dir = os.path.join(tmp_path, 'full')
  assert checkpoints.damage(_checkpoint(run_dir, 2)) is None
  assert checkpoints.damage(_checkpoint(run_dir, 3)) is not None  # no manifest: never used
  assert not os.path.exists(os.path.join(run_dir, 'final_model'))
  # With space again, the same command resumes from round 2 and finishes.
  code, _, err = _run(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=full')
  assert code == 0, err
  assert 'Checkpoint of round 3 is damaged' in err


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
  first = _binary(*_RUN[:-4], '--total_rounds=40', *_RUN[-3:], f'--root_output_dir={tmp_path}',
                  '--experiment_name=busy')
  try:
    _wait_for(os.path.join(tmp_path, 'busy', 'hparams.json'), first)
    code, _, err = _run(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=busy')
    assert code == 1
    assert f'in use by another run (pid {first.pid})' in err
    assert first.poll() is None  # the first run is untouched
  finally:
    first.kill()
    first.wait()


def test_diverging_updates_stop_the_run_and_nothing_non_finite_is_written(tmp_path):
  run_dir = os.path.join(tmp_path, 'diverged')
  code, _, err = _run('--dataset=synthetic', '--algorithm=fedavg', '--clients_per_round=20',
                      '--total_rounds=4', '--client_learning_rate=1e30', '--progress_bar=false',
                      f'--root_output_dir={tmp_path}', '--experiment_name=diverged')
  assert code == 1
  assert 'client updates were not finite and were zeroed' in err or 'not finite' in err
  assert 'the last good checkpoint is round' in err
  for name in ('test_metrics.json', 'final_model'):
    assert not os.path.exists(os.path.join(run_dir, name))
  for round_num in checkpoints.intact_rounds(os.path.join(run_dir, 'checkpoints')):
    assert checkpoints.damage(_checkpoint(run_dir, round_num)) is None


@pytest.mark.parametrize('flag', ['--server_learning_rate=inf', '--client_learning_rate=nan',
                                  '--l2=inf', '--dp_clip=nan'])
def test_non_finite_flags_are_refused_first(tmp_path, flag):
  code, _, err = _run('--dataset=synthetic', flag, f'--root_output_dir={tmp_path}', timeout=300)
  assert code == 2
  assert err.strip().splitlines()[-2].startswith(f'run_federated: error: {flag.split("=")[0]}')
  assert not os.path.exists(os.path.join(tmp_path, 'federated'))


def test_resuming_with_different_result_flags_is_refused_before_anything_is_written(tmp_path):
  short = [*_RUN[:-4], '--total_rounds=1', *_RUN[-3:]]
  code, _, err = _run(*short, f'--root_output_dir={tmp_path}', '--experiment_name=r')
  assert code == 0, err
  hparams = os.path.join(tmp_path, 'r', 'hparams.json')
  with open(hparams) as f:
    before = f.read()
  code, _, err = _run(*short, '--embedding_dim=8', '--l2=0.5', f'--root_output_dir={tmp_path}',
                      '--experiment_name=r')
  assert code == 1
  assert '--embedding_dim (config.model.hparams.embedding_dim): was 4, now 8' in err
  assert '--l2' in err and '--allow_config_change' in err and 'another --experiment_name' in err
  with open(hparams) as f:
    assert f.read() == before
  # Execution-only flags and more rounds may change.
  code, _, err = _run(*_RUN[:-4], '--total_rounds=2', *_RUN[-3:], '--clients_per_subround=7',
                      f'--root_output_dir={tmp_path}', '--experiment_name=r')
  assert code == 0, err


def test_strict_json_refuses_nan_and_writes_nothing(tmp_path):
  path = os.path.join(tmp_path, 'metrics.json')
  with pytest.raises(ValueError, match=r'metrics.json.rmse is nan'):
    atomic.write_json(path, {'rmse': float('nan')})
  assert not os.path.exists(path)
  atomic.write_json(path, {'epsilon': float('inf')}, inf_as_string=True)
  with open(path) as f:
    assert json.load(f) == {'epsilon': 'inf'}


def test_the_local_worker_is_unreachable_from_other_hosts_while_a_run_is_live(tmp_path):
  proc = _binary(*_RUN[:-4], '--total_rounds=40', *_RUN[-3:], f'--root_output_dir={tmp_path}',
                 '--experiment_name=live')
  try:
    _wait_for(os.path.join(tmp_path, 'live', 'checkpoints', 'program_state_1'), proc)
    tree = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in tree if any('worker_binary' in a for a in p.cmdline())]
    assert len(workers) == 1
    worker = workers[0]
    ours = os.readlink('/proc/self/ns/net')
    assert os.readlink(f'/proc/{worker.pid}/ns/net') != ours  # its own network namespace
    with open(f'/proc/{worker.pid}/net/dev') as f:
      interfaces = [line.split(':')[0].strip() for line in f.readlines()[2:]]
    assert interfaces == ['lo']  # nothing but loopback in it
    pids = {p.pid for p in tree} | {proc.pid}
    listening = [c for c in psutil.net_connections('inet')
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert not listening, listening  # no TCP port of the run in this (the host's) namespace
  finally:
    proc.kill()
    proc.wait()
  for p in tree:
    assert processes.gone(p.pid)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
