"""FedRAP: the client step against a NumPy transcription of the reference engine.py and loss.py,
what reaches the server, evaluation with the aggregated table, learning and resume."""

import sys
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import fedrec_protocol as fp
from tff_rec.data import synthetic
from tff_rec.training import device_state
from tff_rec.training import fedrap
from tff_rec.training import personalized
from tff_rec.training import personalized_loop
from tff_rec.training import personalized_process as pp

# Small tables need a small lambda: the -lambda * MSE(P, C) term pushes the
# tables apart, and only the dense weight decay holds it (as at the
# reference's scale, where a batch has thousands of rows).
CFG = fedrap.FedRAPConfig(embedding_dim=8, batch_size=64, item_learning_rate=20.0, lam=0.01,
                          mu=0.01)


@pytest.fixture(scope='module')
def data():
  r = synthetic.clustered_interactions(num_users=24, num_items=80, num_clusters=4, per_user=15,
                                       seed=0)
  return fp.fedrec_split(r, seed=0, num_eval_negatives=20)


def _reference_client(C, P, w, b, items, labels, cfg, round_num):
  """engine.py:133-155 with model.py and loss.py ('l1'), in NumPy float64: one SGD
  optimizer with dense weight decay, ExponentialLR per batch, early stop on the
  running mean loss."""
  C, P, w, b = C.astype(np.float64), P.astype(np.float64), w.astype(np.float64), float(b)
  lr_h = cfg.head_learning_rate * cfg.round_decay ** round_num
  lr_i = cfg.item_learning_rate * cfg.round_decay ** round_num
  lam, mu, wd = cfg.lam, cfg.mu, cfg.weight_decay
  k, total, count, running = 0, 0.0, 0, []
  for epoch in range(cfg.local_epochs):
    for start in range(0, items.size, cfg.batch_size):
      it, y = items[start:start + cfg.batch_size], labels[start:start + cfg.batch_size]
      e_p, e_c = P[it], C[it]
      s = e_p + e_c
      x = s @ w + b
      p = (1.0 / (1.0 + np.exp(-x))).astype(np.float32).astype(np.float64)
      g = (p - y) / np.maximum(p * (1 - p), 1e-12) * (p * (1 - p)) / y.size
      m = e_p.size
      bce = -np.mean(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))
      total += (bce - lam * np.mean((e_p - e_c) ** 2) + mu * np.mean(np.abs(e_c))) * y.size
      count += y.size
      d_s = g[:, None] * w[None, :]
      d_p = d_s - lam * 2 * (e_p - e_c) / m
      d_c = d_s + lam * 2 * (e_p - e_c) / m + mu * np.sign(e_c) / m
      f = cfg.batch_decay ** k
      grad_w, grad_b = s.T @ g + wd * w, g.sum() + wd * b
      gp, gc = wd * P, wd * C
      np.add.at(gp, it, d_p)
      np.add.at(gc, it, d_c)
      P, C = P - lr_i * f * gp, C - lr_i * f * gc
      w, b = w - lr_h * f * grad_w, b - lr_h * f * grad_b
      k += 1
    running.append(total / count)
    if epoch > 0 and abs(running[-1] - running[-2]) / abs(running[-2]) < cfg.tol:
      break
  return C, P, w, b, count


def test_client_step_matches_reference_transcription(data):
  C, state = fedrap.initial_values(CFG, data.num_items, seed=0)
  ex = fp.round_examples(data, 'as_published', np.random.default_rng(0))
  items, labels = ex.of(2)
  for cfg, round_num in ((CFG, 0), (fedrap.FedRAPConfig(embedding_dim=8, batch_size=16,
                                                          local_epochs=3, lam=0.001), 4)):
    got = fedrap.local_train(tf.constant(C), tf.constant(state['personality']),
                             tf.constant(state['head_w']), tf.constant(state['head_b']),
                             tf.constant(items), tf.constant(labels), tf.constant(round_num),
                             config=cfg)
    ref = _reference_client(C, state['personality'], state['head_w'], state['head_b'], items,
                            labels, cfg, round_num)
    for a, b in zip(got[:4], ref[:4]):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4)
    assert float(got[5]) == ref[4]
  # The early stop: a tolerance no loss change meets runs every epoch, a huge one stops at 2.
  for tol, epochs in ((0.0, 10), (1e9, 2)):
    cfg = fedrap.FedRAPConfig(embedding_dim=8, batch_size=64, tol=tol)
    out = fedrap.local_train(tf.constant(C), tf.constant(state['personality']),
                             tf.constant(state['head_w']), tf.constant(state['head_b']),
                             tf.constant(items), tf.constant(labels), tf.constant(0), config=cfg)
    assert float(out[5]) == epochs * items.size


def test_only_the_commonality_is_aggregated_and_eval_uses_the_aggregate(data, tff_context):
  del tff_context
  recorded = []

  class Recording(tff.aggregators.UnweightedAggregationFactory):

    def create(self, value_type):
      recorded.append(value_type)
      return tff.aggregators.UnweightedMeanFactory().create(value_type)

  process = fedrap.build_fedrap(config=CFG, num_items=data.num_items, model_aggregator=Recording())
  table = tff.TensorType(np.float32, [data.num_items, CFG.embedding_dim])
  assert [str(t) for t in recorded] == [str(tff.StructType([table]))]
  result = process.next.type_signature.result
  assert result.personal.placement is tff.CLIENTS
  assert result.personal.member == fedrap.personal_type(CFG, data.num_items)
  for leaf in tff.structure.flatten(result.metrics.member.train):
    assert leaf.shape == ()

  C, state = fedrap.initial_values(CFG, data.num_items, seed=0)
  users = np.array([1, 6])
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(1), users=users)
  clients = personalized_loop.client_inputs(data, users, ex, [state, state])
  out = process.next(process.initialize(), clients)
  refs = [_reference_client(C, state['personality'], state['head_w'], state['head_b'],
                            *ex.of(k), CFG, 0) for k in range(len(users))]
  mean_c = np.mean([r[0] for r in refs], axis=0)
  np.testing.assert_allclose(out['state'].global_model_weights.trainable[0], mean_c, rtol=1e-3,
                             atol=1e-3)
  assert out['state'].client_work == 1  # the round number the clients' rates decay by
  val_hr = []
  for (_, P, w, b, _), got, client in zip(refs, out['personal'], clients):
    np.testing.assert_allclose(got['personality'], P, rtol=1e-3, atol=1e-3)
    probs = 1 / (1 + np.exp(-((P + mean_c) @ w + b)))
    d = client['data']
    rank = np.sum(probs[d['val_negatives']] >= probs[d['val_item']])
    val_hr.append(float(rank < 10))
  assert out['metrics']['train']['val_hr'] == pytest.approx(np.mean(val_hr))


def test_learns_and_resumes_with_its_personal_table(data, tmp_path, tff_context):
  del tff_context
  # (On an 80-item catalog, leak_free draws the held-out items as training
  # negatives in most rounds; the learning check uses the published protocol.)
  loop = lambda n: personalized_loop.LoopConfig(rounds=n, protocol='as_published')
  full = personalized.train('fedrap', data, hparams=CFG, loop=loop(6), progress=False,
                            run_dir=str(tmp_path / 'full'))
  assert np.mean([h['val_hr'] for h in full.history[-3:]]) > 0.8
  assert full.best['test_hr'] > 0.8
  part = str(tmp_path / 'part')
  personalized.train('fedrap', data, hparams=CFG, loop=loop(3), progress=False, run_dir=part)
  resumed = personalized.train('fedrap', data, hparams=CFG, loop=loop(6), progress=False,
                               run_dir=part)
  assert resumed.rounds_run == 3
  for a, b in zip(full.history, resumed.history):
    assert a['val_hr'] == b['val_hr'] and a['loss'] == pytest.approx(b['loss'], rel=1e-5)
  _, state = fedrap.initial_values(CFG, data.num_items, 0)
  ids = [str(u) for u in range(data.num_users)]
  a = device_state.DeviceStateStore(str(tmp_path / 'full' / 'devices'), state).read(ids, 6)
  b = device_state.DeviceStateStore(os.path.join(part, 'devices'), state).read(ids, 6)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x['personality'], y['personality'], rtol=1e-5, atol=1e-5)
  # Each device's table is its own.
  assert not np.allclose(a[0]['personality'], a[1]['personality'])


def test_config_is_checked():
  with pytest.raises(ValueError, match='regular'):
    fedrap.FedRAPConfig(regular='l3')
  with pytest.raises(ValueError, match='curriculum'):
    fedrap.FedRAPConfig(curriculum='cosine')
  lam, mu = fedrap._weights(fedrap.FedRAPConfig(curriculum='tanh'), tf.constant(10))
  assert float(lam) == pytest.approx(0.1 * np.tanh(1.0))
  lam, mu = fedrap._weights(fedrap.FedRAPConfig(regular='none'), tf.constant(3))
  assert float(lam) == pytest.approx(0.1) and float(mu) == 0.0
  assert pp.METRIC_SUMS[:4] == pp.TRAIN_SUMS


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
