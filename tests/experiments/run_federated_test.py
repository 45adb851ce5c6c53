"""run_federated: flag validation before any work, and resume after kill -9."""

import glob
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from experiments import run_federated
from tests import shared_data
from tff_rec.training import artifacts

FLAGS = flags.FLAGS


def _parse(*argv):
  FLAGS.unparse_flags()
  FLAGS(['run_federated', *argv])


@pytest.fixture(autouse=True)
def _restore_flags():
  with flagsaver.flagsaver():
    yield
  FLAGS.unparse_flags()


@pytest.mark.parametrize('argv,flag', [
    (['--model=bogus'], '--model'),
    (['--algorithm=fedsgd'], '--algorithm'),
    (['--dataset=ml-3m'], '--dataset'),
])
def test_unknown_names_are_rejected_at_parse_time(argv, flag):
  with pytest.raises(flags.IllegalFlagValueError, match=flag.lstrip('-')):
    _parse(*argv)


@pytest.mark.parametrize('argv,flag', [
    (['--client_learning_rate=0'], '--client_learning_rate'),
    (['--server_learning_rate=-1'], '--server_learning_rate'),
    (['--total_rounds=0'], '--total_rounds'),
    (['--clients_per_round=-3'], '--clients_per_round'),
    (['--batch_size=0'], '--batch_size'),
    (['--client_epochs=0'], '--client_epochs'),
    (['--max_examples_per_user=0'], '--max_examples_per_user'),
    (['--data_dir=/nonexistent/ml-100k'], '--data_dir'),
    (['--algorithm=fedprox', '--proximal_strength=0'], '--algorithm/--weighting/--proximal_strength'),
    (['--test_fraction=1.5'], 'data flags'),
])
def test_invalid_values_are_rejected_before_any_work(argv, flag, tmp_path):
  _parse(*argv, f'--root_output_dir={tmp_path}')
  with pytest.raises(app.UsageError, match=flag):
    run_federated.main(['run_federated'])
  assert not os.listdir(tmp_path)


def test_clients_per_round_above_population(tmp_path):
  _parse('--dataset=synthetic', '--clients_per_round=1000', f'--root_output_dir={tmp_path}')
  with pytest.raises(app.UsageError, match=r'--clients_per_round=1000 exceeds the population of 120'):
    run_federated.main(['run_federated'])
  assert not os.listdir(tmp_path)


def _binary(*argv, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.run_federated', *argv], cwd=shared_data.REPO_ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_binary_prints_a_clear_message_and_fails(tmp_path):
  proc = _binary('--dataset=synthetic', '--clients_per_round=0', f'--root_output_dir={tmp_path}')
  _, err = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert '--clients_per_round must be positive, got 0' in err
  assert 'Traceback' not in err


_RUN = ['--dataset=synthetic', '--split=random', '--model=mf', '--embedding_dim=4',
        '--algorithm=fedavg', '--clients_per_round=40', '--total_rounds=6', '--checkpoint_every=1',
        '--eval_every=3', '--client_learning_rate=0.2', '--progress_bar=false', '--seed=3']


def _final_weights(run_dir):
  rec, _, _, _ = artifacts.load_final_model(run_dir)
  return [v.numpy() for v in rec.keras_model.weights]


@pytest.mark.slow
def test_resume_after_kill_reaches_the_same_weights(tmp_path):
  straight = _binary(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=straight')
  assert straight.wait(timeout=900) == 0, straight.stderr.read()

  crashed = _binary(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=crashed')
  checkpoint = os.path.join(tmp_path, 'crashed', 'checkpoints', 'program_state_3')
  deadline = time.monotonic() + 900
  while not os.path.isdir(checkpoint):
    assert crashed.poll() is None, crashed.stderr.read()
    assert time.monotonic() < deadline
    time.sleep(0.2)
  crashed.send_signal(signal.SIGKILL)
  crashed.wait()
  assert not os.path.exists(os.path.join(tmp_path, 'crashed', 'final_model'))

  resumed = _binary(*_RUN, f'--root_output_dir={tmp_path}', '--experiment_name=crashed')
  _, err = resumed.communicate(timeout=900)
  assert resumed.returncode == 0, err
  assert 'from the checkpoint of round' in err
  for a, b in zip(_final_weights(os.path.join(tmp_path, 'straight')),
                  _final_weights(os.path.join(tmp_path, 'crashed'))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # The metrics CSV has one row per round, without duplicates from the crash.
  with open(os.path.join(tmp_path, 'crashed', 'metrics.csv')) as f:
    rounds = [line.split(',')[0] for line in f.read().splitlines()[1:]]
  assert rounds == [str(r) for r in range(0, 7)]
  assert not glob.glob(os.path.join(tmp_path, 'crashed', 'checkpoints', '*_temp*'))


def _prepared(*argv):
  _parse('--dataset=synthetic', '--weighting=uniform', '--algorithm=fedrecon', '--clients_per_round=20',
         *argv)
  from experiments import dp_flags  # pylint: disable=g-import-not-at-top
  from tff_rec.training import data_setup  # pylint: disable=g-import-not-at-top
  config = run_federated.config_from_flags()
  split = data_setup.load_split(config.data)
  config, _, kwargs = run_federated.prepare_run(
      config, run_federated.execution_from_flags(), split, dp_flags.dp_config_from_flags(),
      FLAGS.compression, FLAGS.compression_threshold)
  return config, kwargs


def test_dp_with_compression_quantizes_inside_the_clip():
  config, kwargs = _prepared('--dp=gaussian_fixed', '--dp_noise_multiplier=1.0', '--dp_clip=1.0',
                             '--compression=quantize8', '--compression_threshold=10')
  assert not config.algorithm.row_sparse_mean
  metrics = kwargs['extra_metrics_fn'](3)
  assert metrics['comm/upload_compression'] > 2.0
  assert metrics['dp/epsilon'] > 0
  assert kwargs['hparams_extra']['compression'] == {'mode': 'quantize8', 'threshold': 10}


def test_weighted_dp_is_refused():
  with pytest.raises(app.UsageError, match='--weighting'):
    _prepared('--weighting=num_examples', '--dp=gaussian_fixed', '--dp_noise_multiplier=1.0',
              '--dp_clip=1.0')


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
