"""Central DP-SGD baseline: exact clipping, accounting, outputs."""

import sys
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from privacy import accounting
from privacy import dpsgd
from tff_rec.data import errors
from tff_rec.data import splits
from tff_rec.data import synthetic


@pytest.fixture(scope='module')
def split():
  data = synthetic.synthetic_ratings(num_users=40, num_items=30, mean_ratings_per_user=10, seed=5)
  return splits.split_random(data.ratings, fractions=(0.8, 0.0, 0.2), seed=0)


def _small(**kw):
  args = dict(noise_multiplier=1.1, l2_norm_clip=1.0, learning_rate=0.01, batch_size=50, epochs=1,
              delta=1e-5, mf_dim=3, mlp_dim=4)
  args.update(kw)
  return dpsgd.DpSgdConfig(**args)


def test_small_run_trains_and_reports_the_accountants_epsilon(split):
  config = _small()
  result = dpsgd.train(split.train, split.test, config)
  n = split.train.num_ratings
  steps = n // config.batch_size
  q = config.batch_size / n
  assert result.steps == steps and result.num_units == n
  p = result.privacy
  assert p['epsilon_rdp'] == accounting.dpsgd_epsilon(1.1, q, steps, 1e-5, 'rdp')
  assert p['epsilon_pld'] == accounting.dpsgd_epsilon(1.1, q, steps, 1e-5, 'pld')
  assert p['epsilon_clt'] == accounting.dpsgd_epsilon_clt(1.1, q, steps, 1e-5)
  assert math.isfinite(result.test_rmse) and 0 < result.test_rmse < 4
  assert [h['epoch'] for h in result.history] == [1]


def _weights(model):
  return [v.numpy().copy() for v in model.trainable_variables]


def _batch(num_users, num_items, n, seed=0):
  rng = np.random.default_rng(seed)
  users = rng.integers(0, num_users, n).astype(np.int32)
  users[1] = users[0]  # A repeated user and item: per-example rows overlap.
  items = rng.integers(0, num_items, n).astype(np.int32)
  items[2] = items[0]
  labels = rng.integers(0, 5, n).astype(np.int32)
  return users, items, labels


def _clipped_sum(logits_model, groups, users, items, labels, clip):
  """Brute force: sum over groups of the clipped gradient of the group's mean loss."""
  total = [np.zeros(v.shape, np.float64) for v in logits_model.trainable_variables]
  for rows in groups:
    with tf.GradientTape() as tape:
      logits = logits_model({'user': users[rows], 'item': items[rows]})
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels[rows], logits))
    grads = [tf.convert_to_tensor(g).numpy() for g in
             tape.gradient(loss, logits_model.trainable_variables)]
    norm = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads))
    factor = min(1.0, clip / norm)
    total = [t + factor * g for t, g in zip(total, grads)]
  return total


def test_per_example_fast_clipping_equals_brute_force():
  clip = 0.05
  config = _small(noise_multiplier=1e-9, l2_norm_clip=clip)
  _, logits_model = dpsgd.build_model(20, 15, config)
  trainer = dpsgd._ExampleTrainer(logits_model, config)  # pylint: disable=protected-access
  trainer.model.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=trainer.model.loss)
  users, items, labels = _batch(20, 15, 16)
  expected = _clipped_sum(logits_model, [[k] for k in range(16)], users, items, labels, clip)
  before = _weights(logits_model)
  trainer.model.train_on_batch({'user': users, 'item': items}, labels)
  for b, a, e in zip(before, _weights(logits_model), expected):
    np.testing.assert_allclose(b - a, e, atol=1e-6)


def test_user_level_clipping_equals_brute_force(split):
  clip = 0.05
  config = _small(noise_multiplier=1e-9, l2_norm_clip=clip, unit='user')
  data = split.train.sorted_by_user()
  offsets = data.user_offsets()
  _, logits_model = dpsgd.build_model(data.num_users, data.num_items, config)
  trainer = dpsgd._UserTrainer(logits_model, config)  # pylint: disable=protected-access
  trainer.optimizer = tf.keras.optimizers.SGD(1.0)
  trainer._step = tf.function(trainer._train_step)  # pylint: disable=protected-access
  chosen = np.array([0, 3, 7])
  labels = dpsgd.rating_classes(data.ratings)
  groups, start = [], 0
  for u in chosen:
    size = offsets[u + 1] - offsets[u]
    groups.append(np.arange(start, start + size))
    start += size
  rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in chosen])
  expected = _clipped_sum(logits_model, groups, data.users[rows], data.items[rows], labels[rows],
                          clip)
  before = _weights(logits_model)
  trainer.step(data, labels, offsets, chosen)
  for b, a, e in zip(before, _weights(logits_model), expected):
    np.testing.assert_allclose(b - a, e, atol=1e-6)


def test_user_level_run_reports_user_level_epsilon(split):
  config = _small(unit='user', batch_size=8)
  result = dpsgd.train(split.train, split.test, config)
  users = len(split.train.present_users())
  assert result.num_units == users
  assert result.privacy['adjacency'] == 'add or remove one user'
  assert result.privacy['epsilon_rdp'] == accounting.dpsgd_epsilon(
      1.1, 8 / users, users // 8, 1e-5)


def test_non_private_run_has_infinite_epsilon(split):
  result = dpsgd.train(split.train, split.test, _small(noise_multiplier=0.0))
  assert result.privacy['epsilon_rdp'] == math.inf
  assert result.privacy['epsilon_clt'] == math.inf


def test_empty_batch_takes_a_noise_only_step():
  config = _small()
  _, logits_model = dpsgd.build_model(10, 10, config)
  trainer = dpsgd._ExampleTrainer(logits_model, config)  # pylint: disable=protected-access
  before = _weights(logits_model)
  ratings = synthetic.synthetic_ratings(num_users=10, num_items=10, seed=1).ratings
  trainer.step(ratings, dpsgd.rating_classes(ratings.ratings), np.zeros(0, np.int64))
  assert any(not np.allclose(b, a) for b, a in zip(before, _weights(logits_model)))


def test_poisson_batches_have_the_expected_size():
  rng = np.random.default_rng(0)
  sizes = [len(b) for b in dpsgd.poisson_batches(100000, 0.01, 50, rng)]
  assert np.mean(sizes) == pytest.approx(1000, rel=0.02)
  assert len(set(sizes)) > 1  # Poisson, not fixed size.


def test_non_integer_ratings_are_refused():
  with pytest.raises(errors.DataError, match='integer ratings 1..5'):
    dpsgd.rating_classes(np.array([1.0, 4.5]))
  np.testing.assert_array_equal(dpsgd.rating_classes(np.array([1.0, 5.0])), [0, 4])


def test_config_validation():
  with pytest.raises(ValueError, match='unit'):
    dpsgd.DpSgdConfig(unit='item')
  with pytest.raises(ValueError, match='batch_size'):
    dpsgd.steps_per_epoch(10, 20)


def test_results_are_written_atomically(split, tmp_path):
  result = dpsgd.train(split.train, split.test, _small(epochs=2))
  json_path, md_path = dpsgd.write_result(result, str(tmp_path / 'out'), extra={'data': 'x'})
  record = json.loads(open(json_path).read())
  assert record['test_rmse'] == pytest.approx(result.test_rmse)
  assert record['privacy']['epsilon_rdp'] == pytest.approx(result.privacy['epsilon_rdp'])
  assert record['published']['test_rmse_dp'] == 0.915 and record['data'] == 'x'
  assert len(record['history']) == 2
  assert 'this run' in open(md_path).read()
  assert sorted(os.listdir(tmp_path / 'out')) == ['result.json', 'result.md']


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
