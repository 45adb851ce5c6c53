"""experiments/reproduce.py --quick on real MovieLens, every table (the CI smoke test).

Checks the table has its rows and columns, every metric is finite, the trained
models beat the trivial predictor (rows not exempted in quick mode), the
manifest records flags, seeds and versions, and reruns resume.
"""

import csv
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from experiments.tables import compression_ml1m
from experiments.tables import harness
from experiments.tables import registry as tables
from tests import shared_data

REPO_ROOT = shared_data.REPO_ROOT


def _data_dir() -> str:
  for name in ('ml-100k.zip', 'ml-1m.zip', 'ncf-ml-1m.zip'):
    path = shared_data.shared_file(name)
  return os.path.dirname(path)


def _reproduce(*args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'experiments.reproduce', *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _check_outputs(name: str, out: str) -> list[dict]:
  table = tables.get(name)
  for f in ('table.csv', 'table.md', 'table.png', 'manifest.json'):
    assert os.path.exists(os.path.join(out, f)), f
  with open(os.path.join(out, 'table.csv')) as f:
    lines = list(csv.DictReader(f))
  assert [(r['setting'], r['row']) for r in lines] == [(r.setting, r.label) for r in table.rows]
  header = lines[0].keys()
  for column in table.columns:
    assert f'{column.key}_mean' in header
  for spec, line in zip(table.rows, lines):
    if spec.kind == harness.PUBLISHED:
      continue
    assert line['status'] == 'done', (spec.label, line['status'], line['notes'])
    means = {k[:-5]: v for k, v in line.items() if k.endswith('_mean') and v != ''}
    assert table.check_metric in means, spec.label
    for k, v in means.items():
      assert math.isfinite(float(v)), (spec.label, k, v)
    if spec.kind == harness.OURS and spec.beats_trivial_quick:
      assert line[f'beats_trivial_{table.check_metric}'] == 'yes', spec.label
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  assert manifest['table'] == name and manifest['options']['quick']
  assert manifest['options']['seeds'] == [0] and manifest['flags']['quick']
  assert manifest['versions']['tensorflow-federated'] and manifest['machine']['cores']
  assert all(c['status'] == 'done' and c['machine']['cores'] for c in manifest['cells'])
  assert manifest['data'] and manifest['data_unrecorded'] == 0
  for source in manifest['data']:
    assert source['path'].startswith(_data_dir())
    if 'checksum_verified' in source:
      assert source['checksum_verified'], source
  md = open(os.path.join(out, 'table.md')).read()
  assert 'Quick mode' in md and 'cores' in md and 'Wall time' in md
  return lines


@pytest.mark.slow
def test_central_baselines_quick_and_rerun_skips_finished_cells(tmp_path):
  out = str(tmp_path / 'out')
  proc = _reproduce('--table=central_baselines', '--quick', f'--data_dir={_data_dir()}',
                    f'--output_dir={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = _check_outputs('central_baselines', out)
  cells = sorted(os.listdir(os.path.join(out, 'cells')))
  assert len(cells) == 12

  again = _reproduce('--table=central_baselines', '--quick', f'--data_dir={_data_dir()}',
                     f'--output_dir={out}')
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count('done before') == 12
  assert sorted(os.listdir(os.path.join(out, 'cells'))) == cells
  # Nothing was loaded the second time; the data provenance comes from the reused cells.
  assert _check_outputs('central_baselines', out) == lines
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  assert sorted(d['dataset'] for d in manifest['data']) == ['ml-100k', 'ml-1m']


@pytest.mark.slow
def test_fedrecon_quick_resumes_a_partially_trained_cell(tmp_path):
  out = str(tmp_path / 'out')
  # Interrupted: FedRecon cells trained for 1 of their 2 rounds.
  first = _reproduce('--table=fedrecon_ml1m', '--quick', f'--data_dir={_data_dir()}',
                     f'--output_dir={out}', '--rows=FedRecon', '--max_rounds=1')
  assert first.returncode == 0, first.stderr[-4000:]
  proc = _reproduce('--table=fedrecon_ml1m', '--quick', f'--data_dir={_data_dir()}',
                    f'--output_dir={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stderr.count('from the checkpoint of round 1') == 2
  _check_outputs('fedrecon_ml1m', out)
  [run_dir] = glob.glob(os.path.join(out, 'runs', 'tutorial-fedrecon-s0-*'))
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    rounds = [line.split(',')[0] for line in f.read().splitlines()[1:]]
  assert rounds == ['0', '1', '2']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ncf_ml1m', 'privacy_ml1m', 'compression_ml1m',
                                  'federated_ncf_ml100k'])
def test_quick_table(name, tmp_path):
  out = str(tmp_path / 'out')
  proc = _reproduce(f'--table={name}', '--quick', f'--data_dir={_data_dir()}',
                    f'--output_dir={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = _check_outputs(name, out)
  if name == 'privacy_ml1m':
    eps = {r['row']: r['epsilon_mean'] for r in lines}
    assert all(float(v) > 0 for k, v in eps.items() if k.startswith('DP'))
  if name == 'federated_ncf_ml100k':
    eps = {r['row']: r['epsilon_mean'] for r in lines if 'DP' in r['row']}
    assert eps and all(0 < float(v) <= 8.0 for v in eps.values())
  if name == 'compression_ml1m':
    sizes = {r['row']: float(r['gzip_bytes_mean']) for r in lines if r['gzip_bytes_mean']}
    assert sizes[compression_ml1m.CP_INT8] < sizes[compression_ml1m.CP_FLOAT] / 3


def test_invalid_flags_are_usage_errors(tmp_path):
  proc = _reproduce('--table=central_baselines', '--seeds=0,0', f'--output_dir={tmp_path}')
  assert proc.returncode != 0 and '--seeds must be distinct' in proc.stderr
  proc = _reproduce('--table=nope', f'--output_dir={tmp_path}')
  assert proc.returncode != 0 and 'table' in proc.stderr
  proc = _reproduce('--table=ncf_ml1m', '--data_dir=/nonexistent', f'--output_dir={tmp_path}')
  assert proc.returncode != 0 and '--data_dir=/nonexistent' in proc.stderr


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
