"""TF Serving export of real (small) training runs: layout, signatures, reload, errors."""

import sys
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from compression import quantization
from tests import shared_data
from tests.export import run_fixtures
from tff_rec.export import serving
from tff_rec.export import warmup
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment

# Max |int8 export - float model| on the rating scale: measured 0.016 on this
# synthetic MF run and 0.027 on ML-1M MF (benchmarks/compression_benchmark.py);
# each stored weight is within scale / 2 = max|row| / 254 of its float value.
INT8_TOLERANCE = 0.03
FLOAT_TOLERANCE = 1e-5


def _b(ids):
  return np.array([str(i).encode() for i in ids], dtype=object)


@pytest.fixture(scope='module')
def mf(mf_run):
  return artifacts.load_final_model(mf_run)


@pytest.fixture(scope='module')
def split():
  return data_setup.load_split(run_fixtures.synthetic_data())


@pytest.fixture(scope='module')
def exports(tmp_path_factory, mf, split):
  base = str(tmp_path_factory.mktemp('exports'))
  rec, cfg, ui, ii = mf
  cold = serving.ExportOptions(exclude_seen=True, unknown_user='cold_start', unknown_item='cold_start')
  return {
      'base': base,
      'cold': serving.export(rec.keras_model, cfg, ui, ii, base, 'mf', 1, cold, seen=split.train),
      'strict': serving.export(rec.keras_model, cfg, ui, ii, base, 'mf_strict', 1),
      'int8': serving.export(rec.keras_model, cfg, ui, ii, base, 'mf_int8', 1,
                             storage_fn=quantization.storage_fn('int8')),
  }


def _keras_predict(mf, users, items):
  rec, cfg, _, _ = mf
  out = rec.keras_model({'user': tf.constant(users, tf.int32), 'item': tf.constant(items, tf.int32)})
  return np.clip(out.numpy(), *cfg['rating_scale'])


def _mf_weights(mf):
  model = mf[0].keras_model
  get = lambda name: model.get_layer(name).get_weights()[0]
  return (get('user_embedding'), get('item_embedding'), get('user_bias')[:, 0],
          get('item_bias')[:, 0], float(get('global_bias')))


def test_layout_and_models_config(exports):
  base = exports['base']
  for name in ('mf', 'mf_strict', 'mf_int8'):
    version_dir = os.path.join(base, name, '1')
    assert os.listdir(os.path.join(base, name)) == ['1']  # no temporary leftovers
    for f in ('saved_model.pb', 'variables/variables.index', 'assets.extra/tf_serving_warmup_requests'):
      assert os.path.isfile(os.path.join(version_dir, f)), f
  config = serving.read_models_config(os.path.join(base, 'models.config'))
  entries = {c.name: c for c in config.model_config_list.config}
  assert sorted(entries) == ['mf', 'mf_int8', 'mf_strict']
  for name, entry in entries.items():
    assert entry.base_path == os.path.abspath(os.path.join(base, name))
    assert entry.model_platform == 'tensorflow'
  assert exports['cold'].signatures == ('serving_default', 'recommend')


def test_saved_model_cli_show_lists_signatures(exports):
  out = serving.cli_show(exports['cold'].version_dir)
  for expected in ("signature_def['serving_default']", "signature_def['recommend']",
                   "inputs['user_id']", "inputs['item_id']", "inputs['k']", 'DT_STRING',
                   "outputs['prediction']", "outputs['item_ids']", "outputs['scores']"):
    assert expected in out


def test_saved_model_cli_run_matches_keras(exports, mf, tmp_path):
  _, _, ui, ii = mf
  users, items = np.array([0, 5, 17]), np.array([3, 7, 11])
  exprs = {'user_id': '["0", "5", "17"]', 'item_id': '["3", "7", "11"]'}  # Python literals
  serving.cli_run(exports['strict'].version_dir, 'serving_default', exprs, outdir=str(tmp_path))
  got = np.load(tmp_path / 'prediction.npy')
  assert ui.raw_ids[5] == '5' and ii.raw_ids[7] == '7'
  np.testing.assert_allclose(got, _keras_predict(mf, users, items), atol=FLOAT_TOLERANCE)


def test_fresh_process_reload_matches_in_memory_model(exports, mf, split):
  _, _, ui, ii = mf
  test = split.test
  got = serving.predict_in_fresh_process(exports['cold'].version_dir, 'serving_default', {
      'user_id': _b(ui.raw_ids[test.users]), 'item_id': _b(ii.raw_ids[test.items])})
  np.testing.assert_allclose(got['prediction'], _keras_predict(mf, test.users, test.items),
                             atol=FLOAT_TOLERANCE)
  assert not got['cold_start'].any()

  # recommend == top-k of the in-memory scores over all items, training items excluded.
  users = np.array([0, 1, 2])
  rec = serving.predict_in_fresh_process(exports['cold'].version_dir, 'recommend', {
      'user_id': _b(ui.raw_ids[users]), 'k': np.int32(5)})
  n = len(ii)
  scores = mf[0].keras_model({'user': tf.constant(np.repeat(users, n), tf.int32),
                              'item': tf.constant(np.tile(np.arange(n), len(users)), tf.int32)})
  scores = scores.numpy().reshape(len(users), n)
  for row, u in enumerate(users):
    scores[row, split.train.items[split.train.users == u]] = -np.inf
  top = np.argsort(-scores, axis=1)[:, :5]
  assert rec['item_ids'].tolist() == [[ii.raw_ids[i].encode() for i in r] for r in top]
  np.testing.assert_allclose(rec['scores'], np.take_along_axis(scores, top, 1), atol=FLOAT_TOLERANCE)


def test_recommend_excludes_seen_items(exports, mf, split):
  _, _, ui, ii = mf
  fn = serving.load_signature(exports['cold'].version_dir, 'recommend')
  users = np.arange(30)
  out = fn(user_id=tf.constant(_b(ui.raw_ids[users])), k=tf.constant(20))
  for row, u in enumerate(users):
    seen = {ii.raw_ids[i] for i in split.train.items[split.train.users == u]}
    recommended = {x.decode() for x, s in zip(out['item_ids'].numpy()[row], out['scores'].numpy()[row])
                   if np.isfinite(s)}
    assert not recommended & seen
  # Without exclusion the top items include seen ones for some user.
  strict = serving.load_signature(exports['strict'].version_dir, 'recommend')
  out = strict(user_id=tf.constant(_b(ui.raw_ids[users])), k=tf.constant(20))
  assert any({x.decode() for x in out['item_ids'].numpy()[row]}
             & {ii.raw_ids[i] for i in split.train.items[split.train.users == u]}
             for row, u in enumerate(users))


def test_warmup_requests_parse_and_replay(exports):
  version_dir = exports['cold'].version_dir
  logs = warmup.read_warmup(warmup.warmup_path(version_dir))
  assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
      'serving_default', 'recommend']
  assert {log.predict_log.request.model_spec.name for log in logs} == {'mf'}
  loaded = tf.saved_model.load(version_dir)
  for log in logs:
    request = log.predict_log.request
    inputs = warmup.request_inputs(log)
    out = loaded.signatures[request.model_spec.signature_name](
        **{k: tf.constant(v) for k, v in inputs.items()})
    assert out


def test_int8_export_is_int8_and_within_tolerance(exports, mf, split):
  _, _, ui, ii = mf
  test = split.test
  fn = serving.load_signature(exports['int8'].version_dir)
  got = fn(user_id=tf.constant(_b(ui.raw_ids[test.users])),
           item_id=tf.constant(_b(ii.raw_ids[test.items])))['prediction'].numpy()
  diff = np.max(np.abs(got - _keras_predict(mf, test.users, test.items)))
  assert 0 < diff <= INT8_TOLERANCE
  reader = tf.train.load_checkpoint(os.path.join(exports['int8'].version_dir, 'variables', 'variables'))
  dtypes = {k: v for k, v in reader.get_variable_to_dtype_map().items() if 'embedding' in k or 'bias' in k}
  assert any(v == tf.int8 for v in dtypes.values())
  assert not any(v == tf.float32 and reader.get_variable_to_shape_map()[k] == [len(ui), 8]
                 for k, v in dtypes.items())


def test_unknown_ids_raise_with_error_policy(exports):
  loaded = tf.saved_model.load(exports['strict'].version_dir)
  with pytest.raises(tf.errors.InvalidArgumentError, match='unknown user_id'):
    loaded.signatures['serving_default'](user_id=tf.constant(['0', 'nobody']),
                                         item_id=tf.constant(['1', '2']))
  with pytest.raises(tf.errors.InvalidArgumentError, match='unknown item_id'):
    loaded.signatures['serving_default'](user_id=tf.constant(['0']), item_id=tf.constant(['nothing']))
  with pytest.raises(tf.errors.InvalidArgumentError, match='unknown user_id'):
    loaded.signatures['recommend'](user_id=tf.constant(['nobody']), k=tf.constant(3))
  with pytest.raises(tf.errors.InvalidArgumentError, match='k must be positive'):
    loaded.signatures['recommend'](user_id=tf.constant(['0']), k=tf.constant(0))
  with pytest.raises(tf.errors.InvalidArgumentError, match='same length'):
    loaded.signatures['serving_default'](user_id=tf.constant(['0', '1']), item_id=tf.constant(['1']))
  # The message names the unknown ids (integer ids outside the runs, and non-integers).
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'unknown item_id.*\[007 -1\]'):
    loaded.signatures['serving_default'](user_id=tf.constant(['0', '0', '0']),
                                         item_id=tf.constant(['1', '007', '-1']))


def test_unknown_ids_cold_start_fall_back_to_biases(exports, mf):
  _, _, ui, ii = mf
  _, _, bu, bi, mu = _mf_weights(mf)
  loaded = tf.saved_model.load(exports['cold'].version_dir)
  out = loaded.signatures['serving_default'](user_id=tf.constant(['nobody', '3']),
                                             item_id=tf.constant(['4', 'nothing']))
  np.testing.assert_allclose(out['prediction'].numpy(),
                             np.clip([mu + bi[4], mu + bu[3]], 1, 5), atol=FLOAT_TOLERANCE)
  assert out['cold_start'].numpy().tolist() == [True, True]
  rec = loaded.signatures['recommend'](user_id=tf.constant(['nobody']), k=tf.constant(5))
  assert rec['cold_start'].numpy().tolist() == [True]
  top = np.argsort(-(mu + bi))[:5]  # item-bias-only popularity ranking
  np.testing.assert_allclose(rec['scores'].numpy()[0], (mu + bi)[top], atol=FLOAT_TOLERANCE)


def test_existing_version_needs_overwrite(exports, mf):
  rec, cfg, ui, ii = mf
  base = exports['base']
  before = os.path.getmtime(os.path.join(base, 'mf_strict', '1', 'saved_model.pb'))
  with pytest.raises(serving.ExportError, match='already exists'):
    serving.export(rec.keras_model, cfg, ui, ii, base, 'mf_strict', 1)
  assert os.listdir(os.path.join(base, 'mf_strict')) == ['1']
  assert os.path.getmtime(os.path.join(base, 'mf_strict', '1', 'saved_model.pb')) == before
  result = serving.export(rec.keras_model, cfg, ui, ii, base, 'mf_strict', 1, overwrite=True)
  assert os.listdir(os.path.join(base, 'mf_strict')) == ['1']
  assert result.version_dir == os.path.join(base, 'mf_strict', '1')


def test_failed_export_leaves_no_directories(tmp_path, mf, monkeypatch):
  rec, cfg, ui, ii = mf

  def boom(*args, **kwargs):
    raise RuntimeError('disk full')

  base = tmp_path / 'exports'
  monkeypatch.setattr(warmup, 'write_warmup', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    serving.export(rec.keras_model, cfg, ui, ii, str(base), 'mf', 1)
  assert not base.exists()
  monkeypatch.undo()
  serving.export(rec.keras_model, cfg, ui, ii, str(base), 'mf', 1, serving.ExportOptions(warmup=False))
  monkeypatch.setattr(warmup, 'write_warmup', boom)
  with pytest.raises(RuntimeError):
    serving.export(rec.keras_model, cfg, ui, ii, str(base), 'mf', 2)
  assert os.listdir(base / 'mf') == ['1']


def test_missing_and_incomplete_runs(tmp_path, mf_run):
  with pytest.raises(artifacts.RunOutputError, match='no such training run'):
    artifacts.load_final_model(str(tmp_path / 'nope'))
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  with pytest.raises(artifacts.RunOutputError, match='did not finish'):
    artifacts.load_final_model(str(unfinished))
  broken = tmp_path / 'broken'
  shutil.copytree(mf_run, broken)
  os.remove(broken / 'final_model' / 'weights' / 'weights.index')
  with pytest.raises(artifacts.RunOutputError, match='missing'):
    artifacts.load_final_model(str(broken))


def test_bad_export_requests(tmp_path, mf):
  rec, cfg, ui, ii = mf
  base = str(tmp_path)
  with pytest.raises(serving.ExportError, match='Supported: table: mf'):
    serving.export(rec.keras_model, dict(cfg, model='neumf', user_embedding='local'), ui, ii,
                   base, 'x', 1)
  with pytest.raises(serving.ExportError, match='unknown user_embedding'):
    serving.check_supported(dict(cfg, user_embedding='server'))
  with pytest.raises(serving.ExportError, match='version must be a positive integer'):
    serving.export(rec.keras_model, cfg, ui, ii, base, 'x', 0)
  with pytest.raises(serving.ExportError, match='invalid model name'):
    serving.export(rec.keras_model, cfg, ui, ii, base, 'a/b', 1)
  with pytest.raises(serving.ExportError, match='exclude_seen needs'):
    serving.export(rec.keras_model, cfg, ui, ii, base, 'x', 1, serving.ExportOptions(exclude_seen=True))
  with pytest.raises(serving.ExportError, match='unknown_user must be one of'):
    serving.ExportOptions(unknown_user='guess')
  assert os.listdir(base) == []


@pytest.mark.parametrize('name,hparams', [
    ('neumf', {'factors': 4, 'layers': (8, 4)}),
    ('two_tower', {'embedding_dim': 8, 'item_layers': (8,)}),
])
def test_implicit_models_export(runs_root, tmp_path, name, hparams):
  run_dir = run_fixtures.untrained_run(runs_root, name, **hparams)
  rec, cfg, ui, ii = artifacts.load_final_model(run_dir)
  result = serving.export(rec.keras_model, cfg, ui, ii, str(tmp_path), name, 1,
                          serving.ExportOptions(unknown_user='cold_start'))
  loaded = tf.saved_model.load(result.version_dir)
  users, items = np.array([0, 3, 9]), np.array([1, 2, 30])
  out = loaded.signatures['serving_default'](user_id=tf.constant(_b(ui.raw_ids[users])),
                                             item_id=tf.constant(_b(ii.raw_ids[items])))
  logits = rec.keras_model({'user': tf.constant(users), 'item': tf.constant(items)}).numpy()
  np.testing.assert_allclose(out['prediction'].numpy(), logits, atol=FLOAT_TOLERANCE)
  np.testing.assert_allclose(out['probability'].numpy(), 1 / (1 + np.exp(-logits)), atol=1e-6)
  top = loaded.signatures['recommend'](user_id=tf.constant(['0', 'stranger']), k=tf.constant(4))
  assert top['item_ids'].shape == (2, 4)
  assert top['cold_start'].numpy().tolist() == [False, True]


def _ridge(q, b, mu, hist_items, hist_ratings, l2):
  x = np.concatenate([q[hist_items], np.ones([len(hist_items), 1])], axis=1).astype(np.float64)
  y = hist_ratings - mu - b[hist_items]
  w = np.linalg.solve(x.T @ x + l2 * max(len(hist_items), 1) * np.eye(x.shape[1]), x.T @ y)
  return w[:-1], w[-1]


def test_fedrecon_export_reconstructs_user_on_device(fedrecon_run, tmp_path, split):
  rec, cfg, ui, ii = artifacts.load_final_model(fedrecon_run)
  assert cfg['user_embedding'] == 'local'
  options = serving.ExportOptions(exclude_seen=True, unknown_item='cold_start')
  result = serving.export(rec.keras_model, cfg, ui, ii, str(tmp_path), 'recon', 1, options)
  assert result.signatures == ('serving_default', 'recommend_from_history')
  reader = tf.train.load_checkpoint(os.path.join(result.version_dir, 'variables', 'variables'))
  names = list(reader.get_variable_to_shape_map())
  assert not [n for n in names if 'user' in n]  # the server holds no user embedding

  model = rec.keras_model
  q = model.get_layer('item_embedding').get_weights()[0].astype(np.float64)
  b = model.get_layer('item_bias').get_weights()[0][:, 0].astype(np.float64)
  mu = float(model.get_layer('global_bias').get_weights()[0])
  user = split.train.users[0]
  hist = np.flatnonzero(split.train.users == user)
  h_items, h_ratings = split.train.items[hist], split.train.ratings[hist]
  p, bu = _ridge(q, b, mu, h_items, h_ratings, serving.DEFAULT_RECON_L2)
  candidates = np.arange(10)
  expected = np.clip(q[candidates] @ p + b[candidates] + mu + bu, 1, 5)

  inputs = {'history_item_id': _b(ii.raw_ids[h_items]), 'history_rating': h_ratings,
            'item_id': _b(ii.raw_ids[candidates])}
  got = serving.predict_in_fresh_process(result.version_dir, 'serving_default', inputs)
  np.testing.assert_allclose(got['prediction'], expected, atol=1e-4)  # float32 vs float64 solve

  loaded = tf.saved_model.load(result.version_dir)
  fn = loaded.signatures['serving_default']
  in_process = fn(**{k: tf.constant(v) for k, v in inputs.items()})['prediction'].numpy()
  np.testing.assert_allclose(in_process, got['prediction'], atol=FLOAT_TOLERANCE)
  # Unknown history items are left out of the reconstruction.
  noisy = dict(inputs, history_item_id=np.append(inputs['history_item_id'], b'unknown'),
               history_rating=np.append(h_ratings, np.float32(5.0)))
  np.testing.assert_allclose(fn(**{k: tf.constant(v) for k, v in noisy.items()})['prediction'].numpy(),
                             in_process, atol=FLOAT_TOLERANCE)
  # An empty history is the cold start: mu + b_i.
  empty = fn(history_item_id=tf.constant([], tf.string), history_rating=tf.constant([], tf.float32),
             item_id=tf.constant(_b(ii.raw_ids[candidates])))['prediction'].numpy()
  np.testing.assert_allclose(empty, np.clip(mu + b[candidates], 1, 5), atol=FLOAT_TOLERANCE)

  top = loaded.signatures['recommend_from_history'](
      history_item_id=tf.constant(inputs['history_item_id']),
      history_rating=tf.constant(h_ratings), k=tf.constant(5))
  scores = q @ p + b + mu + bu
  scores[h_items] = -np.inf
  best = np.argsort(-scores)[:5]
  assert [x.decode() for x in top['item_ids'].numpy()] == [ii.raw_ids[i] for i in best]
  np.testing.assert_allclose(top['scores'].numpy(), scores[best], atol=1e-4)


@pytest.mark.slow
def test_movielens_100k_central_mf_export_reloads(tmp_path):
  path = shared_data.shared_file('ml-100k.zip')
  config = central.CentralConfig(
      data=data_setup.DataConfig(dataset='ml-100k', data_dir=path),
      model=experiment.ModelConfig('mf', {'embedding_dim': 16}), epochs=2, batch_size=1024,
      root_output_dir=str(tmp_path / 'runs'), experiment_name='ml100k', progress_bar=False)
  run = central.run_central(config)
  rec, cfg, ui, ii = artifacts.load_final_model(run.run_dir)
  split = data_setup.load_split(config.data)
  result = serving.export(rec.keras_model, cfg, ui, ii, str(tmp_path / 'exports'), 'ml100k', 1,
                          serving.ExportOptions(exclude_seen=True), seen=split.train)
  test = split.test.select(np.arange(500))
  got = serving.predict_in_fresh_process(result.version_dir, 'serving_default', {
      'user_id': _b(ui.raw_ids[test.users]), 'item_id': _b(ii.raw_ids[test.items])})
  expected = np.clip(rec.keras_model({'user': tf.constant(test.users), 'item': tf.constant(test.items)}).numpy(),
                     1, 5)
  np.testing.assert_allclose(got['prediction'], expected, atol=FLOAT_TOLERANCE)
  rmse = float(np.sqrt(np.mean((got['prediction'] - test.ratings) ** 2)))
  assert rmse < 1.2
  top = serving.predict_in_fresh_process(result.version_dir, 'recommend', {
      'user_id': _b(ui.raw_ids[[0, 1]]), 'k': np.int32(10)})
  assert top['item_ids'].shape == (2, 10)
  seen0 = {ii.raw_ids[i].encode() for i in split.train.items[split.train.users == 0]}
  assert not set(top['item_ids'][0].tolist()) & seen0


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
