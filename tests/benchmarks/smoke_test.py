"""`benchmarks.run_all --smoke` still runs and writes valid JSON and Markdown.

Numbers are not checked (speed is measured, never asserted).
"""

import json
import os
import subprocess
import sys

import pytest

from tests import shared_data

_MINE = ('federated_speed', 'algorithm_speed', 'accountant_speed', 'secagg_cost', 'pfedrec_speed')


@pytest.fixture(scope='module')
def smoke_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run_all', '--smoke', f'--only={",".join(_MINE)}',
       f'--out_dir={out}'],
      cwd=shared_data.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return str(out)


def _load(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.parametrize('name', _MINE)
def test_each_benchmark_writes_json_and_markdown(smoke_dir, name):
  result = _load(os.path.join(smoke_dir, f'{name}.json'))
  assert result['schema'] == 'tff-rec-benchmark/1' and result['benchmark'] == name
  machine = result['machine']
  assert machine['logical_cores'] >= 1 and machine['ram_total_gib'] > 0 and machine['cpu_model']
  assert result['versions']['tensorflow-federated']
  assert result['parameters']['smoke'] is True
  assert result['results']
  with open(os.path.join(smoke_dir, f'{name}.md')) as f:
    assert f.read().startswith('# ')


def test_federated_speed_reports_rounds_central_epochs_and_memory(smoke_dir):
  results = _load(os.path.join(smoke_dir, 'federated_speed.json'))['results']
  rows = [row for scenario in results.values() for row in scenario['rows']]
  assert {r['variant'] for r in rows} >= {'before', 'after'}
  for row in rows:
    assert row['round_seconds'] > 0 and row['central_epoch_seconds'] > 0
    assert row['optimizer_steps'] > 0 and row['clients_per_second'] > 0
    assert row['peak_rss_worker_gib'] > 0 and row['peak_rss_python_gib'] > 0
  fits = results['smoke_scaling']['fits']
  assert fits and fits[0]['b_ms_per_client'] is not None


def test_secagg_cost_compares_plain_secagg_secagg_plus_and_he(smoke_dir):
  result = _load(os.path.join(smoke_dir, 'secagg_cost.json'))['results']
  rows = result['rows']
  assert {r['method'] for r in rows} == {'plain sum', 'secagg', 'secagg+', 'he (bfv)'}
  assert all(r['exact'] for r in rows)
  secure = [r for r in rows if r['method'] != 'plain sum']
  assert all(r['client_cpu_s'] > 0 and r['server_cpu_s'] > 0 for r in secure)
  assert {r['message_rounds'] for r in secure if r['method'].startswith('secagg')} == {4}
  assert all(r['keyholder_cpu_s'] > 0 for r in secure if r['method'] == 'he (bfv)')
  plain = {(r['model'], r['clients']): r['upload_bytes'] for r in rows if r['method'] == 'plain sum'}
  assert all(r['upload_bytes'] > plain[(r['model'], r['clients'])] for r in secure)
  # Training under each mode: every protocol round verified equal to the plain sum.
  training = {r['mode']: r for r in result['training']}
  assert set(training) == {'none', 'secagg', 'secagg_plus', 'he'}
  for mode, r in training.items():
    assert r['rounds'] == 2 and 0 < r['test_rmse'] < 3
    if mode != 'none':
      assert r['exact_rounds'] == 2 and r['clients'] == 8 and r['upload_bytes'] > 0


def test_algorithm_speed_reports_a_ratio_and_memory_per_algorithm(smoke_dir):
  from benchmarks import algorithm_speed  # pylint: disable=g-import-not-at-top
  results = _load(os.path.join(smoke_dir, 'algorithm_speed.json'))['results']
  names = {a.name for a in algorithm_speed.ALGORITHMS}
  assert set(results['all_users']['ratios']) == {f'{n}_round_over_central' for n in names}
  for row in results['all_users']['rows']:
    assert row['round_seconds'] > 0 and row['central_seconds'] > 0
    assert row['peak_rss_worker_gib'] > 0 and row['peak_rss_python_gib'] > 0
  assert {r['algorithm'] for r in results['all_users_large']['rows']} == names
  assert [r['workers'] for r in results['remote_workers']['rows']] == [1, 2]


def test_accountant_speed_covers_rdp_and_pld(smoke_dir):
  rows = _load(os.path.join(smoke_dir, 'accountant_speed.json'))['results']['rows']
  assert {(r['what'].split('.')[0], r['accountant']) for r in rows} == {
      ('compute_epsilon', 'rdp'), ('compute_epsilon', 'pld'),
      ('EpsilonTracker', 'rdp'), ('EpsilonTracker', 'pld')}
  assert all(r['epsilon'] > 0 for r in rows)


def test_index_lists_every_benchmark_run(smoke_dir):
  index = _load(os.path.join(smoke_dir, 'run_all.json'))['results']
  assert set(index) == set(_MINE) and all(r['status'] == 'ok' for r in index.values())


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))


def test_pfedrec_speed_times_ours_and_says_why_the_reference_did_not_run(smoke_dir):
  rows = _load(os.path.join(smoke_dir, 'pfedrec_speed.json'))['results']['rows']
  ours = [r for r in rows if r['implementation'].startswith('tff_rec')]
  assert ours and all(r['round_s'] > 0 and r['clients'] == 60 for r in ours)
  ref = [r for r in rows if r['implementation'].startswith('reference')]
  assert ref and all(r.get('not_run') or r.get('round_s', 0) > 0 for r in ref)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
