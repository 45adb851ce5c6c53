"""run_personalized: flag errors before any work; a short PFedRec run on real ML-100K, continued."""

import json
import os
import subprocess
import sys

import pytest

from tests import shared_data


def _binary(*argv):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, '-m', 'experiments.run_personalized', *argv], cwd=shared_data.REPO_ROOT,
      env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize('argv,message', [
    (['--rounds=0'], '--rounds must be positive, got 0'),
    (['--lr_eta=-1'], '--lr_eta must be positive, got -1.0'),
    (['--clients_per_round=0'], '--clients_per_round must be positive, got 0'),
    (['--data_dir=/nonexistent/dir'], '--data_dir=/nonexistent/dir does not exist'),
    (['--algorithm=fedrap', '--lr_eta=3'], '--lr_eta is a flag of --algorithm=pfedrec, not fedrap'),
    (['--fedrap_lambda=0.5'], '--fedrap_lambda is a flag of --algorithm=fedrap, not pfedrec'),
    (['--algorithm=fedrap', '--fedrap_mu=-1'], '--fedrap_mu must be >= 0, got -1.0'),
    (['--algorithm=fedmf', '--fedrap_tol=0.1'], '--fedrap_tol is a flag of --algorithm=fedrap, '
     'not fedmf'),
    (['--dp_clip=1'], '--dp_clip needs --dp'),
    (['--dp=gaussian_fixed', '--dp_clip=1'], '--dp=gaussian_fixed needs --dp_noise_multiplier or '
     '--target_epsilon'),
    (['--dp=ddp', '--dp_noise_multiplier=1', '--secure_aggregation=secagg'],
     '--secure_aggregation=secagg is not available in run_personalized'),
])
def test_bad_flags_fail_cleanly_before_any_work(argv, message, tmp_path):
  proc = _binary(*argv, f'--root_output_dir={tmp_path}')
  assert proc.returncode == 2
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_pfedrec_on_ml100k_runs_and_continues(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  common = ['--dataset=ml-100k', f'--data_dir={data_dir}', '--protocol=leak_free',
            '--clients_per_round=100', f'--root_output_dir={tmp_path}', '--experiment_name=pf',
            '--progress_bar=false']
  first = _binary(*common, '--rounds=2')
  assert first.returncode == 0, first.stderr
  second = _binary(*common, '--rounds=4')
  assert second.returncode == 0, second.stderr
  assert 'best round' in second.stdout
  run_dir = tmp_path / 'pf'
  history = json.loads((run_dir / 'history.json').read_text())
  assert [h['round'] for h in history] == [1, 2, 3, 4]
  assert all(h['num_clients'] == 100 for h in history)
  result = json.loads((run_dir / 'result.json').read_text())
  assert result['protocol'] == 'leak_free' and result['rounds'] == 4
  for key in ('test_hr', 'test_ndcg', 'test_full_hr', 'test_full_ndcg'):
    assert 0.0 <= result[key] <= 1.0
  # A different configuration in the same run directory is refused.
  other = _binary(*common, '--rounds=4', '--lr_eta=10')
  assert other.returncode == 1 and 'different configuration' in other.stderr


@pytest.mark.slow
def test_fedrap_on_ml100k_keeps_a_personal_table_per_device(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  proc = _binary('--algorithm=fedrap', '--dataset=ml-100k', f'--data_dir={data_dir}',
                 '--clients_per_round=40', '--rounds=2', f'--root_output_dir={tmp_path}',
                 '--experiment_name=fr', '--progress_bar=false')
  assert proc.returncode == 0, proc.stderr
  config = json.loads((tmp_path / 'fr' / 'config.json').read_text())
  assert config['algorithm'] == 'fedrap' and config['hparams']['item_learning_rate'] == 200.0
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(tmp_path / 'fr' / 'devices' / 'round_000002.npz') as z:
    assert z['personality'].shape[1:] == (1682, 32)
    assert 40 <= z['__client_ids__'].size <= 80


@pytest.mark.slow
def test_pfedrec_with_user_level_dp_reports_epsilon(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  common = ['--dataset=ml-100k', f'--data_dir={data_dir}', '--protocol=leak_free',
            f'--root_output_dir={tmp_path}', '--progress_bar=false', '--rounds=2']
  # The tree accountant needs every user once per epoch: refused with sampling.
  tree = _binary(*common, '--clients_per_round=100', '--dp=tree', '--dp_clip=1',
                 '--dp_noise_multiplier=1', '--experiment_name=tree')
  assert tree.returncode == 2 and 'omit --clients_per_round' in tree.stderr
  assert not os.listdir(tmp_path)
  proc = _binary(*common, '--clients_per_round=200', '--dp=gaussian_fixed', '--dp_clip=5',
                 '--target_epsilon=4', '--experiment_name=dp')
  assert proc.returncode == 0, proc.stderr
  assert 'user-level DP: epsilon' in proc.stdout
  run_dir = tmp_path / 'dp'
  history = json.loads((run_dir / 'history.json').read_text())
  eps = [h['dp/epsilon'] for h in history]
  assert 0 < eps[0] < eps[1] <= 4.0
  result = json.loads((run_dir / 'result.json').read_text())
  dp = result['dp']
  assert dp['mode'] == 'gaussian_fixed' and dp['noise_multiplier_calibrated']
  assert dp['epsilon'] == pytest.approx(eps[-1])
  assert dp['clients_per_round'] == 200 and dp['population'] == 943
  assert dp['sampling'] == 'fixed_size' and dp['delta'] == pytest.approx(943 ** -1.1)
  config = json.loads((run_dir / 'config.json').read_text())
  assert config['aggregator']['noise_multiplier'] == dp['noise_multiplier']
  # Continuing a DP run to more rounds changes its plan: refused.
  more = _binary(*common[:-1], '--rounds=3', '--clients_per_round=200', '--dp=gaussian_fixed',
                 '--dp_clip=5', '--target_epsilon=4', '--experiment_name=dp')
  assert more.returncode == 1 and 'different configuration' in more.stderr


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
