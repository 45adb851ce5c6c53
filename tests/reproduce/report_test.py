"""report: CSV, Markdown, PNG and manifest of a (synthetic) table run."""

import sys
import pytest
import csv
import io
import json
import math
import os

from experiments.tables import harness
from experiments.tables import report


def _run(tmp_path, plot=None):
  rows = [harness.RowSpec('Global mean', 'A', harness.TRIVIAL),
          harness.RowSpec('Model', 'A', published={'rmse': 0.9}, source='Paper 2020'),
          harness.RowSpec('Paper only', 'A', harness.PUBLISHED, {'rmse': 0.8}, 'Paper 2020'),
          harness.RowSpec('Global mean', 'B', harness.TRIVIAL),
          harness.RowSpec('Model', 'B')]

  def build(options):
    cells = []
    for setting in ('A', 'B'):
      for seed in options.seeds:
        cells.append(harness.Cell(f'{setting}-mean-{seed}', ('Global mean',), setting, seed,
                                  {'s': setting, 'seed': seed},
                                  lambda ctx: {'Global mean': {'rmse': 1.1, 'epsilon': math.inf}}))
        cells.append(harness.Cell(f'{setting}-model-{seed}', ('Model',), setting, seed,
                                  {'s': setting, 'seed': seed, 'm': 1},
                                  lambda ctx, s=seed: {'Model': {'rmse': 0.9 + 0.01 * s,
                                                                 'epsilon': 2.0 + s}}))
    return cells

  table = harness.TableSpec(
      name='demo', title='Demo table', description='A demo.',
      columns=[harness.Column('rmse', 'RMSE', lower_is_better=True),
               harness.Column('epsilon', 'eps', 2)],
      rows=rows, build_cells=build, check_metric='rmse', notes=['We differ.'],
      plot=plot or dict(kind='bars', metrics=['rmse'], settings=['A', 'B']))
  options = harness.RunOptions(str(tmp_path), seeds=(0, 1))
  return table, harness.run_table(table, options), options


def test_writes_all_outputs_atomically(tmp_path):
  table, run, options = _run(tmp_path)
  run.source_commit = 'abc123'
  paths = report.write_outputs(table, run, options, 'python -m experiments.reproduce --table=demo',
                               {'table': 'demo', 'seeds': ['0', '1']})
  assert sorted(os.path.basename(p) for p in paths.values()) == [
      'manifest.json', 'table.csv', 'table.md', 'table.png']
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
  with open(paths['table.png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  lines = list(csv.DictReader(io.StringIO(open(paths['table.csv']).read())))
  assert [(r['setting'], r['row']) for r in lines] == [
      ('A', 'Global mean'), ('A', 'Model'), ('A', 'Paper only'), ('B', 'Global mean'),
      ('B', 'Model')]
  model = lines[1]
  assert float(model['rmse_mean']) == 0.905 and float(model['rmse_n']) == 2
  assert float(model['rmse_published']) == 0.9 and model['beats_trivial_rmse'] == 'yes'
  assert lines[2]['rmse_published'] == '0.8' and lines[2]['rmse_mean'] == ''

  md = open(paths['table.md']).read()
  assert '| Model ¹ | 0.9050 ± 0.0071 | 0.9000 |' in md
  assert '## B' in md and 'We differ.' in md and 'Paper 2020' in md
  assert '2 cores' in md or 'cores' in md
  assert 'Wall time of this invocation' in md

  manifest = json.load(open(paths['manifest.json']))
  assert manifest['table'] == 'demo' and manifest['options']['seeds'] == [0, 1]
  assert manifest['commit'] == 'abc123' and 'invocation): abc123' in md
  assert manifest['flags'] == {'table': 'demo', 'seeds': ['0', '1']}
  assert 'tensorflow' in manifest['versions'] and manifest['machine']['cores']
  assert len(manifest['cells']) == 8 and all(c['status'] == 'done' for c in manifest['cells'])


def test_infinite_and_missing_values_render(tmp_path):
  table, run, _ = _run(tmp_path)
  md = report.to_markdown(table, run.rows, harness.beats_trivial(table, run.rows),
                          {'repeats': [0, 1], 'machine': harness.version.machine_info(), 'versions': {},
                           'command': 'x', 'wall_seconds': 1.0, 'cell_seconds': 2.0,
                           'counts': '8 done'})
  assert '| Global mean | 1.1000 ± 0.0000 | ∞ | ' in md  # inf has no std


def test_scatter_plots(tmp_path):
  table, run, _ = _run(tmp_path, plot=dict(kind='scatter', x='epsilon', y='rmse', logx=True))
  assert report.plot_png(table, run.rows)[:4] == b'\x89PNG'
  table, run, _ = _run(tmp_path, plot=dict(kind='scatter_panels', panels=[
      dict(setting='A', x='epsilon', y='rmse'), dict(setting='B', x='epsilon', y='rmse')]))
  assert report.plot_png(table, run.rows)[:4] == b'\x89PNG'


def test_caps_are_named_only_for_columns_the_table_has(tmp_path):
  table, run, _ = _run(tmp_path)
  summary = {'repeats': [0, 1], 'machine': harness.version.machine_info(), 'versions': {},
             'command': 'x', 'wall_seconds': 1.0, 'cell_seconds': 2.0, 'counts': '8 done',
             'max_rounds': 20, 'max_epochs': None}
  beats = harness.beats_trivial(table, run.rows)
  assert 'Caps' not in report.to_markdown(table, run.rows, beats, summary)  # no rounds column
  table.columns.append(harness.Column('rounds', 'rounds run', 0))
  md = report.to_markdown(table, run.rows, beats, summary)
  assert 'at most 20 rounds (--max_rounds)' in md and 'epochs (--max_epochs)' not in md


def test_run_section_names_cell_machines_and_data(tmp_path):
  table, _, _ = _run(tmp_path)
  options = harness.RunOptions(str(tmp_path / 'fresh'), seeds=(0, 1))
  describe = lambda used: [{'dataset': 'ml-1m', 'path': '/d/ml-1m.zip', 'checksum': 'ab' * 32,
                            'checksum_verified': True}]
  run = harness.run_table(table, options, describe_data=describe)
  paths = report.write_outputs(table, run, options, 'cmd', {})
  md = open(paths['table.md']).read()
  me = harness.version.machine_info()
  assert f'- Cells ran on: {me["cpu"]}, {me["cores"]} cores: 8 cells, ' in md
  assert '- Data: ml-1m from /d/ml-1m.zip (sha256 abababababab…, verified)' in md
  manifest = json.load(open(paths['manifest.json']))
  assert manifest['data'] == describe({}) and manifest['data_unrecorded'] == 0
  assert all(c['machine']['cores'] == me['cores'] for c in manifest['cells'])

  # Cells saved before cells kept a record: the rerun that reuses them says so.
  cells = sorted((tmp_path / 'fresh' / 'cells').iterdir())
  for path in cells[:3]:
    record = json.loads(path.read_text())
    del record['machine'], record['data']
    path.write_text(json.dumps(record))
  run = harness.run_table(table, options, describe_data=describe)
  md = open(report.write_outputs(table, run, options, 'cmd', {})['table.md']).read()
  assert 'no record (older cells did not keep one): 3 cells' in md
  assert f'{me["cores"]} cores: 5 cells' in md
  assert 'no record for 3 cells (older cells did not keep one)' in md
  assert 'ml-1m from /d/ml-1m.zip' in md


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
