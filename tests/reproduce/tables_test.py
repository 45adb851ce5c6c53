"""tables / common: every table's cells cover its rows; splits and data paths."""

import sys
import dataclasses
import glob
import json
import os
import re

import numpy as np
import pytest

from experiments.tables import common
from experiments.tables import fedrecon_ml1m
from experiments.tables import harness
from experiments.tables import privacy_ml1m
from experiments.tables import registry as tables
from experiments.tables import shared
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.training import algorithms
from tff_rec.training import central
from tff_rec.training import checkpoints
from tff_rec.training import execution
from tff_rec.training import experiment

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize('name', sorted(tables.TABLES))
@pytest.mark.parametrize('quick', [True, False])
def test_cells_cover_the_rows(name, quick):
  table = tables.get(name)
  options = harness.RunOptions('/nonexistent', seeds=(0, 1), quick=quick, max_rounds=100)
  cells = table.build_cells(options)
  names = [c.name for c in cells]
  assert len(names) == len(set(names))
  produced = {(c.setting, r) for c in cells for r in c.rows}
  wanted = {(r.setting, r.label) for r in table.rows if r.kind != harness.PUBLISHED}
  assert produced == wanted
  keys = [c.key for c in cells]
  assert len(keys) == len(set(keys))
  assert table.check_metric in [c.key for c in table.columns]
  for setting in {r.setting for r in table.rows if r.kind == harness.OURS}:
    assert any(r.kind == harness.TRIVIAL and r.setting == setting for r in table.rows), setting


def test_quick_mode_checks_every_row_that_can_beat_the_trivial_predictor():
  """--quick exempts only rows two rounds cannot train, and DP-SGD (scored on its own split)."""
  exempt = {name: sorted(r.label for r in tables.get(name).rows
                         if r.kind == harness.OURS and not r.beats_trivial_quick)
            for name in tables.TABLES}
  assert not exempt['central_baselines']
  assert exempt['privacy_ml1m'] == sorted(
      [privacy_ml1m.PV_DPSGD, 'FedAvg, shared user row (non-private)',
       'DP-FedAvg, shared user row, fixed clip 0.5, z=1.0'])
  assert all('(central)' not in label for label in exempt['ncf_ml1m'])


def test_federated_ncf_popularity_matches_on_device_ranking():
  """The trivial row ranks like the personalized processes' devices (ties against)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from experiments.tables import federated_ncf  # pylint: disable=g-import-not-at-top
  from tff_rec.data import fedrec_protocol  # pylint: disable=g-import-not-at-top
  from tff_rec.training import personalized_process  # pylint: disable=g-import-not-at-top
  r = synthetic.clustered_interactions(num_users=30, num_items=60, num_clusters=3, per_user=12,
                                       seed=1)
  data = fedrec_protocol.fedrec_split(r, seed=0, num_eval_negatives=20)
  got = federated_ncf.popularity_metrics(data, top_k=5)
  counts = np.bincount(data.train_items, minlength=data.num_items).astype(np.float32)
  sums = {}
  for u in range(data.num_users):
    m = personalized_process.device_metrics(tf.constant(counts), dict(
        train_items=tf.constant(data.train_items_of(u)), val_item=tf.constant(data.val_items[u]),
        val_negatives=tf.constant(data.val_negatives[u]),
        test_item=tf.constant(data.test_items[u]),
        test_negatives=tf.constant(data.test_negatives[u])), data.num_items, 5)
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) / data.num_users
  assert got['hr@5'] == pytest.approx(sums['test_hit'])
  assert got['ndcg@5'] == pytest.approx(sums['test_ndcg'], rel=1e-5)
  assert got['full_hr@5'] == pytest.approx(sums['test_full_hit'])
  assert got['full_ndcg@5'] == pytest.approx(sums['test_full_ndcg'], rel=1e-5)
  assert got['full_hr@5'] <= got['hr@5'] and 0 < got['hr@5'] < 1


def test_quick_and_full_cells_differ():
  table = tables.get('fedrecon_ml1m')
  quick = {c.key for c in table.build_cells(harness.RunOptions('/o', seeds=(0,), quick=True))}
  full = {c.key for c in table.build_cells(harness.RunOptions('/o', seeds=(0,)))}
  assert not quick & full


def test_round_cap_is_recorded_but_keeps_the_run_dir():
  table = tables.get('fedrecon_ml1m')
  capped = table.build_cells(harness.RunOptions('/o', seeds=(0,), max_rounds=100))
  full = table.build_cells(harness.RunOptions('/o', seeds=(0,), max_rounds=None))
  a = next(c for c in capped if c.name == 'full-fedrecon-s0')
  b = next(c for c in full if c.name == 'full-fedrecon-s0')
  assert a.params['total_rounds'] == 100 and b.params['total_rounds'] == 500
  assert a.run_hash == b.run_hash and a.params_hash != b.params_hash


def test_cell_params_come_from_the_result_config_alone():
  result_fields = {f.name for f in dataclasses.fields(experiment.FederatedConfig)}
  result_fields |= {f.name for f in dataclasses.fields(algorithms.AlgorithmConfig)}
  execution_fields = {f.name for f in dataclasses.fields(execution.ExecutionConfig)}
  assert not result_fields & execution_fields


def test_fields_at_their_default_are_left_out_of_cell_params():
  cfg = fedrecon_ml1m.fr_config(fedrecon_ml1m.fr_settings(False)[1], 'fedrecon', 0, 20)
  a = shared.federated_params({}, cfg)
  explicit = dataclasses.replace(cfg, algorithm=dataclasses.replace(
      cfg.algorithm, reconstruction='gradient'))
  closed = dataclasses.replace(cfg, algorithm=dataclasses.replace(
      cfg.algorithm, reconstruction='closed_form'))
  assert shared.federated_params({}, explicit) == a
  assert 'reconstruction' not in a['config']['algorithm']
  assert shared.federated_params({}, closed)['config']['algorithm']['reconstruction'] == 'closed_form'


def _defaults(cls) -> dict:
  out = {}
  for field in dataclasses.fields(cls):
    if field.default is not dataclasses.MISSING:
      out[field.name] = harness._canonical(field.default)  # pylint: disable=protected-access
    elif field.default_factory is not dataclasses.MISSING:
      out[field.name] = harness._canonical(field.default_factory())  # pylint: disable=protected-access
  return out


def test_config_defaults_are_pinned():
  """Cell params leave out fields at their default (harness.config_params), so a changed
  default would silently reuse cells computed with the old one. If this fails on purpose:
  re-key or recompute the affected committed cells (tools/migrate_cell_keys.py checks
  settings) and update tests/reproduce/testdata/config_defaults.json."""
  with open(os.path.join(os.path.dirname(__file__), 'testdata', 'config_defaults.json')) as f:
    pinned = json.load(f)
  current = {name: _defaults(cls) for name, cls in (
      ('FederatedConfig', experiment.FederatedConfig), ('CentralConfig', central.CentralConfig),
      ('DpRow', privacy_ml1m._DpRow))}  # pylint: disable=protected-access
  assert current == pinned


@pytest.mark.parametrize('manifest', sorted(glob.glob(os.path.join(_REPO, 'results', '*', 'manifest.json'))))
def test_committed_results_match_the_cells_the_code_builds(manifest):
  """A change to a cell's settings (e.g. a new config field) must not orphan committed results."""
  with open(manifest) as f:
    record = json.load(f)
  out = os.path.dirname(manifest)
  opts = record['options']
  options = harness.RunOptions(out, seeds=tuple(opts['seeds']), quick=opts['quick'],
                               max_rounds=opts['max_rounds'], max_epochs=opts.get('max_epochs'),
                               rows=tuple(opts.get('rows', ())))
  cells = harness.select_cells(tables.get(record['table']).build_cells(options), options.rows)
  missing = [c.key for c in cells if not os.path.exists(harness.cell_path(out, c))]
  assert not missing, f'{out}: no committed result for cells {missing}'


def test_unknown_table():
  with pytest.raises(ValueError, match='unknown table'):
    tables.get('nope')


def _ratings():
  return synthetic.synthetic_ratings(num_users=40, num_items=60, mean_ratings_per_user=6,
                                     seed=4).ratings


def test_kfold_partitions_the_ratings():
  r = _ratings()
  tests = [common.kfold_split(r, 5, f, seed=1).test for f in range(1, 6)]
  keys = np.concatenate([t.users.astype(np.int64) * 1000 + t.items for t in tests])
  assert np.unique(keys).size == r.num_ratings == keys.size
  fold = common.kfold_split(r, 5, 2, seed=1)
  assert fold.train.num_ratings + fold.test.num_ratings == r.num_ratings
  assert abs(fold.test.num_ratings - r.num_ratings / 5) <= 1
  with pytest.raises(ValueError):
    common.kfold_split(r, 5, 6, seed=1)


def test_first_users_split_keeps_negatives_aligned():
  split = splits.split_leave_one_out(_ratings(), num_negatives=3, seed=0)
  sub = common.first_users_split(split, 10)
  assert set(sub.train.present_users()) <= set(range(10))
  assert sub.negatives.shape == (sub.test.num_ratings, 3)
  rows = np.flatnonzero(split.test.users < 10)
  np.testing.assert_array_equal(sub.negatives, split.negatives[rows])


def test_global_mean_and_popularity_baselines():
  split = splits.split_leave_one_out(_ratings(), num_negatives=3, seed=0)
  m = common.global_mean_metrics(split.train, split.test)
  expected = np.sqrt(np.mean((split.test.ratings - split.train.global_mean()) ** 2))
  assert m['rmse'] == pytest.approx(expected, rel=1e-6)
  p = common.popularity_metrics(split, top_k=2)
  assert 0.0 <= p['ndcg@2'] <= p['hr@2'] <= 1.0


def test_data_location(tmp_path):
  (tmp_path / 'ml-1m.zip').write_bytes(b'')
  options = harness.RunOptions('/o', data_dir=str(tmp_path), data_paths={'ml-100k': '/x/ml100k'})
  assert common.data_location(options, common.ML100K) == '/x/ml100k'
  assert common.data_location(options, common.ML1M) == str(tmp_path / 'ml-1m.zip')
  assert common.data_location(options, common.NCF_ML1M) == str(tmp_path)
  bare = harness.RunOptions('/o')
  assert common.data_location(bare, common.ML1M) is None
  with pytest.raises(ValueError, match='--ncf_ml_1m'):
    common.data_location(bare, common.NCF_ML1M)


def test_capped_rounds_and_run_dir_guard(tmp_path):
  assert common.capped_rounds(harness.RunOptions('/o', max_rounds=100), 500) == 100
  assert common.capped_rounds(harness.RunOptions('/o', max_rounds=None), 500) == 500
  cell = harness.Cell('c', ('r',), '', 0, {}, lambda ctx: {})
  ctx = harness.CellContext(cell, harness.RunOptions(str(tmp_path)), str(tmp_path / 'run'), {})
  assert common.federated_run_dir(ctx, 5) == ctx.run_dir
  checkpoint = tmp_path / 'run' / 'checkpoints' / 'program_state_10'
  os.makedirs(checkpoint / 'variables')
  (checkpoint / 'saved_model.pb').write_bytes(b'x')
  (checkpoint / 'variables' / 'variables.index').write_bytes(b'x')
  assert common.federated_run_dir(ctx, 5) == ctx.run_dir  # no manifest: not a checkpoint yet
  checkpoints.write_manifest(str(checkpoint))
  assert common.federated_run_dir(ctx, 20) == ctx.run_dir  # resumes from round 10
  assert common.federated_run_dir(ctx, 5) == ctx.run_dir + '-r5'  # never reuses a longer run


def test_flag_files_name_their_table_and_known_flags():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  source = open(os.path.join(root, 'experiments', 'reproduce.py')).read()
  known = set(re.findall(r"flags\.DEFINE_\w+\('(\w+)'", source))
  for name in tables.TABLES:
    path = os.path.join(root, 'experiments', 'flags', f'table_{name}.cfg')
    values = {}
    for line in open(path):
      line = line.strip()
      if line and not line.startswith('#'):
        key, _, value = line.lstrip('-').partition('=')
        values[key] = value
    assert values['table'] == name
    assert set(values) <= known, set(values) - known


def test_epoch_cap_applies_to_the_ncf_central_cells():
  table = tables.get('ncf_ml1m')
  capped = table.build_cells(harness.RunOptions('/o', seeds=(0,), max_epochs=3))
  full = table.build_cells(harness.RunOptions('/o', seeds=(0,)))
  epochs = {c.name: c.params['central']['epochs'] for c in capped if 'central' in c.params}
  assert epochs and set(epochs.values()) == {3}
  assert {c.params['central']['epochs'] for c in full if 'central' in c.params} == {20}
  assert common.capped_epochs(harness.RunOptions('/o', max_epochs=None), 20) == 20


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
