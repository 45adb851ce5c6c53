"""Runs experiments/compute_epsilon.py in a subprocess and checks its output."""

import json
import os
import subprocess
import sys
from typing import List

import pytest

from privacy import accounting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(args: List[str]) -> subprocess.CompletedProcess:
  """Runs the binary from the repository root."""
  return subprocess.run(
      [sys.executable, '-m', 'experiments.compute_epsilon', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


def _run_ok(args: List[str], tmp_path) -> dict:
  """Runs the binary, asserts success, returns its JSON record."""
  out = tmp_path / 'sub' / 'eps.json'
  proc = _run([*args, f'--output_json={out}'])
  assert proc.returncode == 0, proc.stderr
  # Atomic write: only the final file, no temporary siblings left behind.
  assert os.listdir(out.parent) == ['eps.json']
  record = json.loads(out.read_text())
  record['_stdout'] = proc.stdout
  return record


def test_epsilon_both_accountants(tmp_path):
  rec = _run_ok(['--dataset=ml-100k', '--clients_per_round=100',
                 '--total_rounds=200', '--noise_multiplier=1.2',
                 '--accountant=both'], tmp_path)
  delta = accounting.default_delta(943)
  assert rec['population'] == 943 and rec['dataset'] == 'ml-100k'
  assert rec['delta'] == pytest.approx(delta, rel=1e-12)
  assert rec['delta_is_default'] is True
  assert rec['neighboring_relation'] == 'ADD_OR_REMOVE_ONE'
  plan = accounting.DpPlan(1.2, 100, 943, 200, delta)
  for acct in ('rdp', 'pld'):
    want = accounting.compute_epsilon(plan, acct)
    assert rec['results'][acct]['epsilon'] == pytest.approx(want, rel=1e-9)
    assert f'{acct}: epsilon = {want:.6g}' in rec['_stdout']
  assert 'population 943 (ml-100k)' in rec['_stdout']


def test_population_flag_wins_and_explicit_delta(tmp_path):
  rec = _run_ok(['--dataset=ml-1m', '--population=500', '--clients_per_round=50',
                 '--total_rounds=30', '--noise_multiplier=1.0',
                 '--delta=1e-5', '--sampling=fixed_size'], tmp_path)
  assert rec['population'] == 500 and rec['dataset'] is None
  assert rec['delta'] == 1e-5 and rec['delta_is_default'] is False
  assert rec['neighboring_relation'] == 'REPLACE_ONE'
  want = accounting.compute_epsilon(
      accounting.DpPlan(1.0, 50, 500, 30, 1e-5, 'fixed_size'))
  assert rec['results']['rdp']['epsilon'] == pytest.approx(want, rel=1e-9)


def test_calibrates_noise_without_noise_multiplier(tmp_path):
  rec = _run_ok(['--dataset=ml-1m', '--clients_per_round=200',
                 '--total_rounds=300', '--target_epsilon=4'], tmp_path)
  result = rec['results']['rdp']
  nm = result['calibrated_noise_multiplier']
  eps = accounting.compute_epsilon(accounting.DpPlan(
      nm, 200, 6040, 300, accounting.default_delta(6040)))
  assert eps <= 4.0 and eps == pytest.approx(4.0, rel=1e-3)
  assert result['epsilon'] == pytest.approx(eps, rel=1e-9)
  assert f'calibrated noise_multiplier = {nm:.6f}' in rec['_stdout']


def test_max_rounds_with_noise_and_target(tmp_path):
  rec = _run_ok(['--population=6040', '--clients_per_round=200',
                 '--noise_multiplier=1.0', '--target_epsilon=3'], tmp_path)
  want = accounting.max_rounds_within(3.0, 1.0, 200, 6040,
                                      accounting.default_delta(6040))
  assert rec['results']['rdp']['max_rounds_within_budget'] == want
  assert f'max rounds within budget = {want}' in rec['_stdout']


def test_over_budget_plan_reports_max_rounds(tmp_path):
  rec = _run_ok(['--dataset=ml-100k', '--clients_per_round=100',
                 '--total_rounds=500', '--noise_multiplier=1.0',
                 '--target_epsilon=10'], tmp_path)
  result = rec['results']['rdp']
  assert result['within_budget'] is False
  assert result['max_rounds_within_budget'] == accounting.max_rounds_within(
      10.0, 1.0, 100, 943, accounting.default_delta(943))
  assert 'OVER BUDGET' in rec['_stdout']


def test_tree_mode(tmp_path):
  rec = _run_ok(['--dataset=ml-100k', '--clients_per_round=100',
                 '--total_rounds=47', '--noise_multiplier=3',
                 '--dp_mode=tree', '--restart_rounds=5'], tmp_path)
  assert rec['neighboring_relation'] == 'REPLACE_SPECIAL'
  assert rec['epoch_rounds'] == 10 and rec['restart_rounds'] == 5
  want = accounting.tree_aggregation_epsilon(
      3.0, 100, 943, 47, accounting.default_delta(943), restart_rounds=5)
  assert rec['results']['rdp']['epsilon'] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize('args,flag', [
    (['--population=943', '--clients_per_round=1000'], '--clients_per_round'),
    (['--dataset=ml-100k', '--clients_per_round=944'], '--clients_per_round'),
    (['--clients_per_round=10'], '--population or --dataset'),
    (['--population=943', '--clients_per_round=0'], '--clients_per_round'),
    (['--population=943', '--clients_per_round=10', '--delta=1.5'], '--delta'),
    (['--population=943', '--clients_per_round=10', '--noise_multiplier=0'],
     '--noise_multiplier'),
    (['--population=943', '--clients_per_round=10', '--total_rounds=0'],
     '--total_rounds'),
    (['--population=943', '--clients_per_round=10', '--dataset=ml-20m'],
     '--dataset'),
    (['--population=943', '--clients_per_round=10', '--sampling=fixed_size',
      '--accountant=pld'], '--accountant'),
    (['--population=943', '--clients_per_round=100', '--dp_mode=tree',
      '--accountant=both'], '--accountant'),
    (['--population=943', '--clients_per_round=100', '--dp_mode=tree',
      '--restart_rounds=3'], '--restart_rounds'),
    (['--population=943', '--clients_per_round=100', '--restart_rounds=5'],
     '--restart_rounds'),
])
def test_flag_errors_name_the_flag(tmp_path, args, flag):
  out = tmp_path / 'eps.json'
  base = {'--noise_multiplier': '1.0', '--total_rounds': '10'}
  given = {a.split('=')[0] for a in args}
  extra = [f'{k}={v}' for k, v in base.items() if k not in given]
  proc = _run([*args, *extra, f'--output_json={out}'])
  assert proc.returncode != 0
  assert flag in proc.stderr, proc.stderr
  assert not out.exists()


@pytest.mark.parametrize('args,message', [
    (['--noise_multiplier=1'], '--total_rounds'),
    (['--total_rounds=10'], '--noise_multiplier, --target_epsilon'),
])
def test_mode_flag_errors(args, message):
  proc = _run(['--population=943', '--clients_per_round=10', *args])
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
