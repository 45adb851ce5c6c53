"""FedRecon under the federated-NCF protocol: reconstruction then item steps, stateless clients, learning, resume."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.data import fedrec_protocol as fp
from tff_rec.data import synthetic
from tff_rec.training import fedrecon_ncf
from tff_rec.training import personalized
from tff_rec.training import personalized_loop

CFG = fedrecon_ncf.FedReconConfig(embedding_dim=8, learning_rate=0.5, lr_eta=2.0, batch_size=16,
                                  recon_epochs=2)


@pytest.fixture(scope='module')
def data():
  r = synthetic.clustered_interactions(num_users=24, num_items=80, num_clusters=4, per_user=15,
                                       seed=0)
  return fp.fedrec_split(r, seed=0, num_eval_negatives=20)


def _grad(x, y):
  p = 1.0 / (1.0 + np.exp(-x))
  return (p - y) / y.size


def _numpy_client(table, w, b, items, labels, cfg, num_items):
  """Reconstruction (head-only passes from the initial value), then item steps with it frozen."""
  table, w, b = table.astype(np.float64), w.astype(np.float64), float(b)
  batches = [(items[s:s + cfg.batch_size], labels[s:s + cfg.batch_size])
             for s in range(0, items.size, cfg.batch_size)]
  for _ in range(cfg.recon_epochs):
    for it, y in batches:
      e = table[it]
      g = _grad(e @ w + b, y)
      w, b = w - cfg.learning_rate * (e.T @ g), b - cfg.learning_rate * g.sum()
  item_lr = cfg.item_learning_rate(num_items)
  for it, y in batches:
    g = _grad(table[it] @ w + b, y)
    np.subtract.at(table, it, item_lr * g[:, None] * w[None, :])
  return table, w, b


def test_config_is_checked():
  with pytest.raises(ValueError, match='recon_epochs >= 1'):
    fedrecon_ncf.FedReconConfig(recon_epochs=0)
  with pytest.raises(ValueError, match="ranking must be 'global'"):
    fedrecon_ncf.FedReconConfig(ranking='fine_tuned')


def test_round_reconstructs_then_trains_items_and_ignores_the_stored_state(data, tff_context):
  del tff_context
  process = fedrecon_ncf.build_fedrecon(config=CFG, num_items=data.num_items)
  table, user0 = fedrecon_ncf.initial_values(CFG, data.num_items, seed=0)
  users = np.array([0, 3, 8])
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(4), users=users)
  stored = {'head_w': np.full(CFG.embedding_dim, 3.0, np.float32), 'head_b': np.float32(-2.0)}
  outs = [process.next(process.initialize(),
                       personalized_loop.client_inputs(data, users, ex, [state] * users.size))
          for state in (user0, stored)]
  # Stateless clients: what the device stored does not change the round.
  np.testing.assert_array_equal(outs[0]['state'].global_model_weights.trainable[0],
                                outs[1]['state'].global_model_weights.trainable[0])
  assert outs[0]['metrics']['train'] == outs[1]['metrics']['train']
  expected = []
  for k in range(users.size):
    t, w, b = _numpy_client(table, user0['head_w'], user0['head_b'], *ex.of(k), CFG,
                            data.num_items)
    expected.append(t)
    np.testing.assert_allclose(outs[0]['personal'][k]['head_w'], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[0]['personal'][k]['head_b'], b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(outs[0]['state'].global_model_weights.trainable[0],
                             np.mean(expected, axis=0), rtol=1e-3, atol=1e-3)
  # The item steps keep (u, b) frozen: one client's local table equals the NumPy one.
  w, b = fedrecon_ncf.pfedrec.fit_head(
      tf.constant(table), tf.constant(user0['head_w']), tf.constant(user0['head_b']),
      tf.constant(ex.of(0)[0]), tf.constant(ex.of(0)[1]), config=CFG, epochs=CFG.recon_epochs)
  local, _, n = fedrecon_ncf.item_steps(tf.constant(table), w, b, tf.constant(ex.of(0)[0]),
                                        tf.constant(ex.of(0)[1]), config=CFG,
                                        num_items=data.num_items)
  assert int(n) == ex.of(0)[0].size
  np.testing.assert_allclose(local.numpy(), expected[0], rtol=2e-4, atol=2e-4)


def test_learns_and_resumes(data, tmp_path, tff_context):
  del tff_context
  cfg = fedrecon_ncf.FedReconConfig(embedding_dim=8, learning_rate=0.5, lr_eta=10.0,
                                    batch_size=16, recon_epochs=3)

  def loop(rounds):
    return personalized_loop.LoopConfig(rounds=rounds, protocol='leak_free', seed=0)

  full = personalized.train('fedrecon', data, hparams=cfg, loop=loop(15), progress=False,
                            run_dir=str(tmp_path / 'full'))
  # Random ranking of 1 in 21 would give HR@10 about 0.48.
  assert np.mean([h['val_hr'] for h in full.history[-4:]]) > 0.75
  part = str(tmp_path / 'part')
  personalized.train('fedrecon', data, hparams=cfg, loop=loop(4), progress=False, run_dir=part)
  resumed = personalized.train('fedrecon', data, hparams=cfg, loop=loop(15), progress=False,
                               run_dir=part)
  assert resumed.rounds_run == 11
  for a, b in zip(full.history, resumed.history):
    assert a['val_hr'] == pytest.approx(b['val_hr'], abs=1e-6)
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
