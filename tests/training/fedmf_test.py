"""FedMF under the federated-NCF protocol: the joint client step, what is aggregated, learning, resume."""

import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.training import recording_aggregator
from tff_rec.data import fedrec_protocol as fp
from tff_rec.data import synthetic
from tff_rec.training import device_state
from tff_rec.training import fedmf
from tff_rec.training import personalized
from tff_rec.training import personalized_loop
from tff_rec.training import personalized_process as pp

CFG = fedmf.FedMFConfig(embedding_dim=8, learning_rate=0.1, lr_eta=2.0, batch_size=16)


@pytest.fixture(scope='module')
def data():
  r = synthetic.clustered_interactions(num_users=24, num_items=80, num_clusters=4, per_user=15,
                                       seed=0)
  return fp.fedrec_split(r, seed=0, num_eval_negatives=20)


def _numpy_client(table, w, b, items, labels, cfg, num_items):
  """FedAvg's SGD in NumPy float64: per batch one step on (u, b) and the item
  rows from the same gradient (BCE with PyTorch's backward)."""
  table, w, b = table.astype(np.float64), w.astype(np.float64), float(b)
  lr, item_lr = cfg.learning_rate, cfg.item_learning_rate(num_items)
  for start in range(0, items.size, cfg.batch_size):
    it, y = items[start:start + cfg.batch_size], labels[start:start + cfg.batch_size]
    e = table[it]
    p = 1.0 / (1.0 + np.exp(-(e @ w + b)))
    g = (p - y) / y.size
    rows = g[:, None] * w[None, :]
    w, b = w - lr * (e.T @ g), b - lr * g.sum()
    np.subtract.at(table, it, item_lr * rows)
  return table, w, b


def test_client_step_is_a_joint_sgd_step(data):
  table, user = fedmf.initial_values(CFG, data.num_items, seed=0)
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(0))
  items, labels = ex.of(2)
  local, w, b, _, n = fedmf.local_train(
      tf.constant(table), tf.constant(user['head_w']), tf.constant(user['head_b']),
      tf.constant(items), tf.constant(labels), config=CFG, num_items=data.num_items)
  ref_t, ref_w, ref_b = _numpy_client(table, user['head_w'], user['head_b'], items, labels, CFG,
                                      data.num_items)
  assert int(n) == items.size
  np.testing.assert_allclose(w.numpy(), ref_w, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(b.numpy(), ref_b, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(local.numpy(), ref_t, rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="ranking must be 'global'"):
    fedmf.FedMFConfig(ranking='fine_tuned')


def test_only_the_item_table_is_aggregated_and_eval_uses_the_aggregate(data, tff_context):
  del tff_context
  recorder = recording_aggregator.RecordingMean()
  process = fedmf.build_fedmf(config=CFG, num_items=data.num_items, model_aggregator=recorder)
  table_type = tff.TensorType(np.float32, [data.num_items, CFG.embedding_dim])
  assert [str(t) for t in recorder.value_types] == [str(tff.StructType([table_type]))]
  result = process.next.type_signature.result
  assert result.personal.placement is tff.CLIENTS
  for leaf in tff.structure.flatten(result.metrics.member.train):
    assert leaf.shape == ()

  table, user = fedmf.initial_values(CFG, data.num_items, seed=0)
  users = np.array([1, 4, 7])
  ex = fp.round_examples(data, 'as_published', np.random.default_rng(3), users=users)
  clients = personalized_loop.client_inputs(data, users, ex, [user] * users.size)
  out = process.next(process.initialize(), clients)
  locals_, heads = [], []
  for k in range(users.size):
    t, w, b = _numpy_client(table, user['head_w'], user['head_b'], *ex.of(k), CFG, data.num_items)
    locals_.append(t)
    heads.append((w, b))
  new_table = out['state'].global_model_weights.trainable[0]
  np.testing.assert_allclose(new_table, np.mean(locals_, axis=0), rtol=1e-3, atol=1e-3)
  # Each device ranks with the aggregated table and its own new user vector.
  hits = []
  for k in range(users.size):
    got = out['personal'][k]
    np.testing.assert_allclose(got['head_w'], heads[k][0], rtol=1e-4, atol=1e-5)
    probs = tf.sigmoid(tf.linalg.matvec(tf.constant(new_table), tf.constant(got['head_w'])) +
                       got['head_b'])
    data_k = {n: tf.constant(v) for n, v in clients[k]['data'].items()}
    hits.append(pp.device_metrics(probs, data_k, data.num_items, CFG.top_k))
  for key in pp.EVAL_SUMS:
    assert out['metrics']['train'][key.replace('_hit', '_hr')] == pytest.approx(
        np.mean([float(h[key]) for h in hits]), abs=1e-6)


def test_learns_and_resumes_with_device_state(data, tmp_path, tff_context):
  del tff_context
  cfg = fedmf.FedMFConfig(embedding_dim=8, lr_eta=10.0, batch_size=16)

  def loop(rounds):
    return personalized_loop.LoopConfig(rounds=rounds, protocol='leak_free', seed=0)

  full = personalized.train('fedmf', data, hparams=cfg, loop=loop(15), progress=False,
                            run_dir=str(tmp_path / 'full'))
  assert full.history[-1]['loss'] < full.history[0]['loss'] - 0.05
  # Random ranking of 1 in 21 would give HR@10 about 0.48; the global table
  # needs more rounds than PFedRec's fine-tuned copies.
  assert np.mean([h['val_hr'] for h in full.history[-4:]]) > 0.75
  part = str(tmp_path / 'part')
  personalized.train('fedmf', data, hparams=cfg, loop=loop(3), progress=False, run_dir=part)
  resumed = personalized.train('fedmf', data, hparams=cfg, loop=loop(15), progress=False,
                               run_dir=part)
  assert resumed.rounds_run == 12
  for a, b in zip(full.history, resumed.history):
    assert a['val_hr'] == pytest.approx(b['val_hr'], abs=1e-6)
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
  _, user = fedmf.initial_values(cfg, data.num_items, 0)
  ids = [str(u) for u in range(data.num_users)]
  s_full = device_state.DeviceStateStore(str(tmp_path / 'full' / 'devices'), user).read(ids, 15)
  s_res = device_state.DeviceStateStore(f'{part}/devices', user).read(ids, 15)
  for a, b in zip(s_full, s_res):
    np.testing.assert_allclose(a['head_w'], b['head_w'], rtol=1e-5, atol=1e-6)
  assert not np.allclose(s_full[0]['head_w'], user['head_w'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
