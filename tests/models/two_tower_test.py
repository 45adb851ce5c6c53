"""Two-tower model: towers vs pointwise scores, partition, retrieval training."""

import sys
import collections

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import metrics
from tff_rec.models import two_tower

NUM_USERS, NUM_ITEMS = 10, 15


def _inputs(users, items) -> collections.OrderedDict:
  return collections.OrderedDict(user=np.asarray(users, np.int32), item=np.asarray(items, np.int32))


@pytest.mark.parametrize('personal', [False, True])
@pytest.mark.parametrize('user_layers,item_layers', [((), (16, 8)), ((12, 8), ()), ((6,), (6,))])
def test_towers_match_pointwise_scores(personal, user_layers, item_layers):
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, user_layers=user_layers,
                                  item_layers=item_layers, personal=personal, seed=3)
  users = np.arange(NUM_USERS, dtype=np.int32)
  matrix = two_tower.score_matrix_fn(rec)(users)
  assert matrix.shape == (NUM_USERS, NUM_ITEMS)
  u, i = np.meshgrid(users, np.arange(NUM_ITEMS), indexing='ij')
  pointwise = rec.keras_model(_inputs(u.reshape(-1), i.reshape(-1))).numpy()
  np.testing.assert_allclose(matrix.reshape(-1), pointwise, rtol=1e-5, atol=1e-7)
  # The towers share the model's weights.
  user_vecs = two_tower.user_tower(rec)(users).numpy()
  item_vecs = two_tower.item_vectors(rec)
  np.testing.assert_allclose(user_vecs @ item_vecs.T, matrix, rtol=1e-6)
  assert {v.ref() for v in two_tower.user_tower(rec).variables} <= {
      v.ref() for v in rec.keras_model.variables}


def test_personal_partition_keeps_user_tower_local():
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, user_layers=(8,),
                                  item_layers=(16, 8), personal=True)
  assert {v.name for v in rec.local_variables} == {
      'user_embedding/embeddings:0', 'user_dense_0/kernel:0', 'user_dense_0/bias:0'}
  assert {v.name for v in rec.global_variables} == {
      'item_embedding/embeddings:0', 'item_dense_0/kernel:0', 'item_dense_0/bias:0',
      'item_dense_1/kernel:0', 'item_dense_1/bias:0'}
  assert rec.embedding_variable_names == ('item_embedding',)
  assert rec.keras_model.get_layer('item_dense_0').activation is tf.keras.activations.relu
  assert rec.keras_model.get_layer('item_dense_1').activation is tf.keras.activations.linear


def test_tower_sizes_must_match():
  with pytest.raises(ValueError, match='user tower outputs 32 dims but item tower 16'):
    two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, item_layers=(16,))


def _positives(num_pairs=300, seed=0):
  """Each user likes a fixed slice of 3 items; plus label-0 rows that must be ignored."""
  rng = np.random.default_rng(seed)
  users = rng.integers(0, NUM_USERS, num_pairs)
  items = (users + rng.integers(0, 3, num_pairs)) % NUM_ITEMS
  return users.astype(np.int32), items.astype(np.int32)


def _dataset(users, items, labels=None, batch=32):
  labels = np.ones(users.shape, np.float32) if labels is None else labels
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=_inputs(users, items), y=labels)).batch(batch)


@pytest.mark.parametrize('in_batch,negatives', [(True, 0), (True, 8), (False, 8)])
def test_fit_retrieval_learns(in_batch, negatives):
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, item_layers=(8,), seed=1)
  users, items = _positives()
  noise_items = (users + 7) % NUM_ITEMS  # label 0: dropped by the trainer
  all_users = np.concatenate([users, users])
  all_items = np.concatenate([items, noise_items])
  labels = np.concatenate([np.ones(users.size), np.zeros(users.size)]).astype(np.float32)
  order = np.random.default_rng(1).permutation(all_users.size)
  data = _dataset(all_users[order], all_items[order], labels[order])
  test_users = np.arange(NUM_USERS)
  before = metrics.full_ranking_metrics(
      two_tower.score_matrix_fn(rec), (np.zeros(0, np.int64),) * 2, (users, items), k=3)
  losses = two_tower.fit_retrieval(rec, data, epochs=8, in_batch=in_batch,
                                   num_sampled_negatives=negatives,
                                   optimizer=tf.keras.optimizers.Adam(0.05))
  assert len(losses) == 8
  assert losses[-1] < 0.8 * losses[0], losses
  after = metrics.full_ranking_metrics(
      two_tower.score_matrix_fn(rec), (np.zeros(0, np.int64),) * 2, (users, items), k=3)
  assert after['recall'] > 0.9 > before['recall']
  scores = two_tower.score_matrix_fn(rec)(test_users)
  assert np.all(scores[test_users, (test_users + 7) % NUM_ITEMS] < scores.max(axis=1))


def test_fit_retrieval_ignores_negative_rows_and_checks_arguments():
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, item_layers=(8,))
  weights = rec.keras_model.get_weights()
  users, items = _positives(64)
  losses = two_tower.fit_retrieval(rec, _dataset(users, items, np.zeros(64, np.float32)))
  assert np.isnan(losses[0])
  for a, b in zip(weights, rec.keras_model.get_weights()):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='num_sampled_negatives > 0'):
    two_tower.fit_retrieval(rec, _dataset(users, items), in_batch=False)
  with pytest.raises(ValueError, match='epochs'):
    two_tower.fit_retrieval(rec, _dataset(users, items), epochs=0)


def test_fit_retrieval_accepts_unlabeled_pairs():
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, item_layers=(8,))
  users, items = _positives(64)
  data = tf.data.Dataset.from_tensor_slices(_inputs(users, items)).batch(16)
  losses = two_tower.fit_retrieval(rec, data, epochs=2)
  assert np.all(np.isfinite(losses))


def test_evaluate_top_k_matches_full_ranking():
  rec = two_tower.build_two_tower(NUM_USERS, NUM_ITEMS, embedding_dim=8, item_layers=(8,), seed=7)
  users = np.arange(NUM_USERS, dtype=np.int32)
  items = np.random.default_rng(0).integers(0, NUM_ITEMS, NUM_USERS).astype(np.int32)
  tfrs_result = two_tower.evaluate_top_k(rec, _dataset(users, items, batch=4), ks=(1, 5))
  for k in (1, 5):
    ours = metrics.full_ranking_metrics(
        two_tower.score_matrix_fn(rec), (np.zeros(0, np.int64),) * 2, (users, items), k=k)
    assert tfrs_result[f'top_{k}_accuracy'] == pytest.approx(ours['hit_rate'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
