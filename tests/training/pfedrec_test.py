"""PFedRec: the client step against a NumPy transcription of the reference engine.py,
on-device ranking against the toolkit's metrics, what reaches the server, learning,
device state and resume."""

import sys
import collections
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.training import recording_aggregator
from tff_rec.data import fedrec_protocol as fp
from tff_rec.data import synthetic
from tff_rec.models import metrics as metrics_lib
from tff_rec.training import device_state
from tff_rec.training import personalized
from tff_rec.training import personalized_loop
from tff_rec.training import personalized_process as pp
from tff_rec.training import pfedrec
from tff_rec.training import run_dir as run_dir_lib

CFG = pfedrec.PFedRecConfig(embedding_dim=8, learning_rate=0.1, lr_eta=2.0, batch_size=16)


@pytest.fixture(scope='module')
def data():
  r = synthetic.clustered_interactions(num_users=24, num_items=80, num_clusters=4, per_user=15,
                                       seed=0)
  return fp.fedrec_split(r, seed=0, num_eval_negatives=20)


def _torch_sgd_client(table, w, b, items, labels, cfg, num_items):
  """engine.py:48-63 and :114-130 in NumPy float64: per batch a head step, then an
  item step with the new head; BCELoss's backward with its 1e-12 clamp."""
  table, w, b = table.astype(np.float64), w.astype(np.float64), float(b)
  lr, item_lr = cfg.learning_rate, cfg.item_learning_rate(num_items)

  def grad(x, y):
    p = 1.0 / (1.0 + np.exp(-x))
    p = p.astype(np.float32).astype(np.float64)  # float32 saturation, as in torch
    return (p - y) / np.maximum(p * (1 - p), 1e-12) * (p * (1 - p)) / y.size

  for start in range(0, items.size, cfg.batch_size):
    it, y = items[start:start + cfg.batch_size], labels[start:start + cfg.batch_size]
    e = table[it]
    g = grad(e @ w + b, y)
    w, b = w - lr * (e.T @ g), b - lr * g.sum()
    g = grad(e @ w + b, y)
    np.subtract.at(table, it, item_lr * g[:, None] * w[None, :])
  return table, w, b


def test_client_step_matches_reference_transcription(data):
  table, head = pfedrec.initial_values(CFG, data.num_items, seed=0)
  ex = fp.round_examples(data, 'as_published', np.random.default_rng(0))
  for saturating_lr_eta in (CFG.lr_eta, 400.0):
    cfg = pfedrec.PFedRecConfig(embedding_dim=8, lr_eta=saturating_lr_eta, batch_size=16)
    local, w, b, _, n = pfedrec.local_train(
        tf.constant(table), tf.constant(head['head_w']), tf.constant(head['head_b']),
        tf.constant(ex.of(3)[0]), tf.constant(ex.of(3)[1]), config=cfg, num_items=data.num_items)
    ref_t, ref_w, ref_b = _torch_sgd_client(table, head['head_w'], head['head_b'], *ex.of(3), cfg,
                                            data.num_items)
    assert int(n) == ex.of(3)[0].size
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(local.numpy(), ref_t, rtol=2e-4, atol=2e-3)
  # Torch's BCELoss backward: zero once float32 sigmoid saturates at 1, and
  # damped where p(1 - p) falls below its 1e-12 clamp.
  x = tf.constant([30.0, -30.0, 0.0])
  p_low = float(np.float32(1 / (1 + np.exp(30.0))))
  np.testing.assert_allclose(pp.bce_logit_grad(x, tf.constant([0.0, 1.0, 1.0])).numpy(),
                             [0.0, (p_low - 1) / 1e-12 * p_low / 3, -0.5 / 3], rtol=1e-5)


def test_device_metrics_match_toolkit_ranking(data):
  rng = np.random.default_rng(1)
  probs = rng.random((data.num_users, data.num_items)).astype(np.float32)
  probs[:, :5] = 1.0  # saturated ties count against the held-out item
  got = collections.defaultdict(list)
  users = np.arange(data.num_users)
  clients = personalized_loop.client_inputs(
      data, users, fp.round_examples(data, 'leak_free', rng), [{}] * data.num_users)
  for u, client in enumerate(clients):
    d = {k: tf.constant(v) for k, v in client['data'].items()}
    for k, v in pp.device_metrics(tf.constant(probs[u]), d, data.num_items, 10).items():
      got[k].append(float(v))
  score = lambda uu, ii: probs[uu, ii]
  for part in ('val', 'test'):
    target = getattr(data, f'{part}_items')
    sampled = metrics_lib.hit_rate_and_ndcg_sampled(
        score, users, target, getattr(data, f'{part}_negatives'), k=10)
    assert np.mean(got[f'{part}_hit']) == pytest.approx(sampled['hit_rate'])
    assert np.mean(got[f'{part}_ndcg']) == pytest.approx(sampled['ndcg'])
    full = metrics_lib.full_ranking_metrics(
        lambda uu: probs[uu], (data.train_users, data.train_items), (users, target), k=10)
    # full_ranking_metrics ranks the test item ahead of ties it has no reason to
    # lose to only among test items; here there is one, so the rules agree.
    assert np.mean(got[f'{part}_full_hit']) == pytest.approx(full['hit_rate'])
    assert np.mean(got[f'{part}_full_ndcg']) == pytest.approx(full['ndcg'])


def test_only_the_item_table_is_aggregated(data, tff_context):
  del tff_context
  recorder = recording_aggregator.RecordingMean()
  process = pfedrec.build_pfedrec(config=CFG, num_items=data.num_items, model_aggregator=recorder)
  table_type = tff.TensorType(np.float32, [data.num_items, CFG.embedding_dim])
  assert [str(t) for t in recorder.value_types] == [str(tff.StructType([table_type]))]
  result = process.next.type_signature.result
  assert result.personal.placement is tff.CLIENTS
  assert result.personal.member == pfedrec.personal_type(CFG)
  metrics = result.metrics
  assert metrics.placement is tff.SERVER
  for leaf in tff.structure.flatten(metrics.member.train):
    assert leaf.shape == ()  # scalar sums only: no per-client value reaches the server
  with pytest.raises(TypeError, match='Unweighted'):
    pfedrec.build_pfedrec(config=CFG, num_items=data.num_items,
                          model_aggregator=tff.aggregators.MeanFactory())

  # The server's new table is the plain mean of the clients' fine-tuned tables
  # (engine.py:67-80), and the new heads are the clients' own.
  state = process.initialize()
  table, head = pfedrec.initial_values(CFG, data.num_items, seed=0)
  np.testing.assert_array_equal(state.global_model_weights.trainable[0], table)
  users = np.array([0, 5, 9])
  ex = fp.round_examples(data, 'as_published', np.random.default_rng(0), users=users)
  heads = [head, head, {'head_w': head['head_w'] * 2, 'head_b': np.float32(0.5)}]
  out = process.next(state, personalized_loop.client_inputs(data, users, ex, heads))
  expected_tables, expected_heads = [], []
  for k, h in enumerate(heads):
    t, w, b = _torch_sgd_client(table, h['head_w'], h['head_b'], *ex.of(k), CFG, data.num_items)
    expected_tables.append(t)
    expected_heads.append((w, b))
  np.testing.assert_allclose(out['state'].global_model_weights.trainable[0],
                             np.mean(expected_tables, axis=0), rtol=1e-3, atol=1e-3)
  for got, (w, b) in zip(out['personal'], expected_heads):
    np.testing.assert_allclose(got['head_w'], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got['head_b'], b, rtol=1e-4, atol=1e-5)
  assert out['metrics']['train']['num_clients'] == 3


def test_fine_tuned_view_differs_from_the_received_table_only_in_the_rounds_rows(data):
  """Why `ranking='global'` exists: a local round changes only the rows of the
  user's training positives and of its sampled negatives (pushed down)."""
  table, head = pfedrec.initial_values(CFG, data.num_items, seed=0)
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(2))
  items, labels = ex.of(4)
  local, w, b, _, _ = pfedrec.local_train(
      tf.constant(table), tf.constant(head['head_w']), tf.constant(head['head_b']),
      tf.constant(items), tf.constant(labels), config=CFG, num_items=data.num_items)
  changed = np.flatnonzero(np.any(local.numpy() != table, axis=1))
  assert set(changed) == set(items.tolist())
  negatives = np.unique(items[labels == 0])
  before = table[negatives] @ w.numpy() + b.numpy()
  after = local.numpy()[negatives] @ w.numpy() + b.numpy()
  assert np.all(after < before)


def test_global_ranking_scores_with_the_aggregate_and_the_own_head(data, tff_context):
  del tff_context
  cfg = pfedrec.PFedRecConfig(embedding_dim=8, learning_rate=0.1, lr_eta=2.0, batch_size=16,
                              ranking='global')
  with pytest.raises(ValueError, match='ranking must be one of'):
    pfedrec.PFedRecConfig(ranking='local')
  process = pfedrec.build_pfedrec(config=cfg, num_items=data.num_items)
  ref = pfedrec.build_pfedrec(config=CFG, num_items=data.num_items)
  table, head = pfedrec.initial_values(cfg, data.num_items, seed=0)
  users = np.array([2, 6, 11])
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(5), users=users)
  clients = personalized_loop.client_inputs(data, users, ex, [head] * users.size)
  out = process.next(process.initialize(), clients)
  out_ref = ref.next(ref.initialize(), clients)
  # Training is PFedRec's: the same new table and heads.
  new_table = out['state'].global_model_weights.trainable[0]
  np.testing.assert_allclose(new_table, out_ref['state'].global_model_weights.trainable[0],
                             rtol=1e-6, atol=1e-6)
  expected = collections.defaultdict(list)
  for k in range(users.size):
    got = out['personal'][k]
    np.testing.assert_allclose(got['head_w'], out_ref['personal'][k]['head_w'], rtol=1e-6)
    probs = tf.sigmoid(tf.linalg.matvec(tf.constant(new_table), tf.constant(got['head_w'])) +
                       got['head_b'])
    data_k = {n: tf.constant(v) for n, v in clients[k]['data'].items()}
    for key, v in pp.device_metrics(probs, data_k, data.num_items, cfg.top_k).items():
      expected[key].append(float(v))
  for key in pp.EVAL_SUMS:
    assert out['metrics']['train'][key.replace('_hit', '_hr')] == pytest.approx(
        np.mean(expected[key]), abs=1e-6)


def test_user_level_dp_clips_each_client_and_noises_the_mean(data, tff_context):
  """With TF Privacy's DP mean the server's table moves by at most the clip
  norm (the mean of updates clipped to it), where the plain mean moves it far
  more; noise makes two runs from the same state differ."""
  del tff_context
  from privacy import dp_aggregators  # pylint: disable=g-import-not-at-top
  users = np.array([0, 5, 9, 13])
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(1), users=users)
  table, head = pfedrec.initial_values(CFG, data.num_items, seed=0)
  clients = personalized_loop.client_inputs(data, users, ex, [head] * users.size)

  def moved(aggregator):
    process = pfedrec.build_pfedrec(config=CFG, num_items=data.num_items,
                                    model_aggregator=aggregator)
    out = process.next(process.initialize(), clients)
    # The device states are the clients' own, whatever the aggregator.
    assert len(out['personal']) == users.size
    return out['state'].global_model_weights.trainable[0] - table

  clip = 0.05
  plain = np.linalg.norm(moved(None))
  clipped = moved(dp_aggregators.build_aggregator(
      dp_aggregators.DpConfig(mode='gaussian_fixed', noise_multiplier=0.0, clip=clip), users.size))
  assert plain > 20 * clip
  assert np.linalg.norm(clipped) <= clip * (1 + 1e-4)
  assert np.linalg.norm(clipped) > 0.5 * clip  # every client's update is clipped, not dropped
  noisy = [moved(dp_aggregators.build_aggregator(
      dp_aggregators.DpConfig(mode='gaussian_fixed', noise_multiplier=1.0, clip=clip), users.size))
           for _ in range(2)]
  assert not np.allclose(noisy[0], noisy[1])
  # Noise std on each entry of the mean: noise_multiplier * clip / clients.
  std = np.std(noisy[0] - clipped)
  assert 0.7 * clip / users.size < std < 1.3 * clip / users.size


def _loop(rounds, seed=0, protocol='as_published'):
  return personalized_loop.LoopConfig(rounds=rounds, protocol=protocol, seed=seed)


def test_learns_and_resumes_with_device_state(data, tmp_path, tff_context):
  del tff_context
  cfg = pfedrec.PFedRecConfig(embedding_dim=8, lr_eta=10.0, batch_size=16)
  full = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(8), progress=False,
                            run_dir=str(tmp_path / 'full'))
  assert full.rounds_run == 8 and len(full.history) == 8
  first, last = full.history[0], full.history[-1]
  assert last['loss'] < first['loss'] - 0.05
  # Random ranking of 1 in 21 would give HR@10 about 0.48.
  assert np.mean([h['val_hr'] for h in full.history[-4:]]) > 0.75
  assert full.best['test_hr'] > 0.75
  assert full.best_round == max(
      h['round'] for h in full.history if h['val_hr'] == max(x['val_hr'] for x in full.history))

  # Stopped after 3 rounds, then continued to 8 by a fresh call: the same run.
  part = str(tmp_path / 'part')
  personalized.train('pfedrec', data, hparams=cfg, loop=_loop(3), progress=False, run_dir=part)
  with pytest.raises(run_dir_lib.ConfigChangedError):
    personalized.train('pfedrec', data, hparams=cfg, loop=_loop(8, seed=1), progress=False,
                       run_dir=part)
  resumed = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(8), progress=False,
                               run_dir=part)
  assert resumed.rounds_run == 5
  for a, b in zip(full.history, resumed.history):
    for k in a:
      if k != 'seconds':
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a['round'])
  # The device states on disk are the same heads, keyed by client id.
  _, head = pfedrec.initial_values(cfg, data.num_items, 0)
  ids = [str(u) for u in range(data.num_users)]
  s_full = device_state.DeviceStateStore(str(tmp_path / 'full' / 'devices'), head).read(ids, 8)
  s_res = device_state.DeviceStateStore(os.path.join(part, 'devices'), head).read(ids, 8)
  for a, b in zip(s_full, s_res):
    np.testing.assert_allclose(a['head_w'], b['head_w'], rtol=1e-5, atol=1e-6)
  assert not np.allclose(s_full[0]['head_w'], head['head_w'])
  # A completed run returns its result without training.
  again = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(8), progress=False,
                             run_dir=str(tmp_path / 'full'))
  assert again.rounds_run == 0 and again.best_round == full.best_round
  with pytest.raises(ValueError, match='already has 8 rounds'):
    personalized.train('pfedrec', data, hparams=cfg, loop=_loop(5), progress=False,
                       run_dir=str(tmp_path / 'full'))


def test_damaged_checkpoint_falls_back_a_round(data, tmp_path, tff_context):
  del tff_context
  cfg = pfedrec.PFedRecConfig(embedding_dim=8, lr_eta=1.0, batch_size=16)
  rd = str(tmp_path / 'run')
  first = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(3), progress=False,
                             run_dir=rd)
  path = os.path.join(rd, 'checkpoints', 'server_000003.npz')
  with open(path, 'r+b') as f:
    f.seek(100)
    f.write(b'\x00\x01\x02')
  again = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(3), progress=False,
                             run_dir=rd)
  assert again.rounds_run == 1
  assert again.history[-1]['val_hr'] == pytest.approx(first.history[-1]['val_hr'])
  # Damaged device states of the last round: the run also goes back a round.
  path = os.path.join(rd, 'devices', 'round_000003.npz')
  with open(path, 'r+b') as f:
    f.seek(60)
    f.write(b'\x00\x01\x02')
  third = personalized.train('pfedrec', data, hparams=cfg, loop=_loop(3), progress=False,
                             run_dir=rd)
  assert third.rounds_run == 1
  assert third.history[-1]['val_hr'] == pytest.approx(first.history[-1]['val_hr'])


def test_device_state_store(tmp_path):
  init = {'w': np.zeros(3, np.float32), 'b': np.float32(0.0)}
  store = device_state.DeviceStateStore(str(tmp_path), init)
  assert [s['w'].tolist() for s in store.read(['a', 'b'], 0)] == [[0, 0, 0]] * 2
  store.write(1, {'a': {'w': np.ones(3), 'b': 1.0}})
  store.write(2, {'b': {'w': np.full(3, 2.0), 'b': 2.0}})
  got = store.read(['a', 'b', 'c'], 2)
  assert [float(s['b']) for s in got] == [1.0, 2.0, 0.0]
  store.write(3, {'c': {'w': np.full(3, 3.0), 'b': 3.0}})
  assert store.rounds() == [2, 3]
  with pytest.raises(device_state.DeviceStateError, match='not finite'):
    store.write(4, {'a': {'w': np.array([np.nan, 0, 0]), 'b': 0.0}})
  with pytest.raises(device_state.DeviceStateError, match='shape'):
    store.write(4, {'a': {'w': np.zeros(4), 'b': 0.0}})
  with pytest.raises(device_state.DeviceStateError, match='no device states of round 6'):
    store.write(7, {})
  path = os.path.join(str(tmp_path), 'round_000003.npz')
  with open(path, 'r+b') as f:
    f.seek(50)
    f.write(b'\xff\xfe')
  fresh = device_state.DeviceStateStore(str(tmp_path), init)
  with pytest.raises(device_state.DeviceStateError, match='damaged'):
    fresh.read(['a'], 3)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
