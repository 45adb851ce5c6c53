"""Runs experiments/run_dpsgd.py in a subprocess on real MovieLens-100K."""

import json
import os
import subprocess
import sys

import pytest

from privacy import accounting
from tests import shared_data

REPO_ROOT = shared_data.REPO_ROOT


def _run(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'experiments.run_dpsgd', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600, check=False, env=env)


@pytest.mark.slow
def test_one_epoch_on_ml100k_writes_json_and_markdown(tmp_path):
  data = shared_data.shared_file('ml-100k.zip')
  out = tmp_path / 'run'
  proc = _run(['--dataset=ml-100k', f'--data_dir={data}', '--epochs=1', f'--output_dir={out}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['result.json', 'result.md']
  record = json.loads((out / 'result.json').read_text())
  # 100,000 ratings, 80/20 split: 80,000 training ratings, 8 Poisson steps per epoch.
  assert record['num_units'] == 80000 and record['steps'] == 8
  assert record['privacy']['epsilon_rdp'] == pytest.approx(
      accounting.dpsgd_epsilon(0.55, 10000 / 80000, 8, 1e-6), rel=1e-12)
  assert 0.8 < record['test_rmse'] < 1.3
  assert 'test RMSE' in proc.stdout


def test_invalid_flag_is_a_usage_error(tmp_path):
  proc = _run(['--batch_size=0', f'--output_dir={tmp_path}'])
  assert proc.returncode != 0
  assert '--batch_size' in proc.stderr


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
