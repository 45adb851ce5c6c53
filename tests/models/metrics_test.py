"""Keras metrics and ranking protocols, against hand-computed values."""

import sys
import collections
import math

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import metrics

# ---------------------------------------------------------------------------
# Keras metrics.

Y_TRUE = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
Y_PRED = np.array([1.5, 2.0, 5.0, 3.625], np.float32)  # errors 0.5, 0, 2, -0.375


def _result(metric, batches):
  for y_true, y_pred in batches:
    metric.update_state(y_true, y_pred)
  return float(metric.result())


def test_rating_metrics_by_hand():
  batches = [(Y_TRUE, Y_PRED)]
  mse = (0.25 + 0 + 4 + 0.140625) / 4
  assert _result(metrics.MeanSquaredError(), batches) == pytest.approx(mse)
  assert _result(metrics.RootMeanSquaredError(), batches) == pytest.approx(math.sqrt(mse))
  assert _result(metrics.MeanAbsoluteError(), batches) == pytest.approx((0.5 + 0 + 2 + 0.375) / 4)
  # |error| <= 0.5 (inclusive): 3 of 4.
  assert _result(metrics.RatingAccuracy(), batches) == pytest.approx(0.75)
  assert _result(metrics.RatingAccuracy(threshold=0.25), batches) == pytest.approx(0.25)


def test_rating_metrics_do_not_clip():
  # The one rule (tff_rec/models/predictions.py): out-of-scale outputs are scored as they are.
  batches = [(np.array([5.0, 1.0]), np.array([5.7, -3.0]))]
  assert _result(metrics.RatingAccuracy(), batches) == 0.0
  assert _result(metrics.MeanAbsoluteError(), batches) == pytest.approx((0.7 + 4.0) / 2)


def test_means_are_per_example_across_uneven_batches():
  # A batch of 3 then a batch of 1: every example weighs the same.
  batches = [(Y_TRUE[:3], Y_PRED[:3]), (Y_TRUE[3:], Y_PRED[3:])]
  err = Y_PRED.astype(np.float64) - Y_TRUE
  assert _result(metrics.MeanSquaredError(), batches) == pytest.approx(np.mean(err ** 2))
  assert _result(metrics.MeanAbsoluteError(), batches) == pytest.approx(np.mean(np.abs(err)))
  rmse = np.sqrt(np.mean(err ** 2))
  assert _result(metrics.RootMeanSquaredError(), batches) == pytest.approx(rmse)
  # Keras' built-in averages per batch for [B] vectors (why we have our own).
  assert _result(tf.keras.metrics.MeanSquaredError(), batches) != pytest.approx(np.mean(err ** 2))
  # [B, 1] labels with [B] predictions are not broadcast into [B, B].
  m = metrics.MeanSquaredError()
  m.update_state(Y_TRUE[:, None], Y_PRED)
  assert float(m.result()) == pytest.approx(np.mean(err ** 2))


def test_implicit_metrics_by_hand():
  labels = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  logits = np.array([2.0, -1.0, -0.5, 0.5], np.float32)
  bce = np.mean(np.log1p(np.exp(-np.where(labels > 0, logits, -logits))))
  result = _result(metrics.BinaryCrossentropyFromLogits(), [(labels, logits)])
  assert result == pytest.approx(bce, rel=1e-6)
  assert _result(metrics.LogitAccuracy(), [(labels, logits)]) == pytest.approx(0.5)
  auc = [m for m in metrics.implicit_metrics_fn() if m.name == 'auc'][0]
  # Positives {2, -0.5} vs negatives {-1, 0.5}: 3 of 4 pairs ordered right.
  assert _result(auc, [(labels, logits)]) == pytest.approx(0.75, abs=0.01)


def test_factories_return_fresh_config_constructible_metrics():
  for fn, names in ((metrics.rating_metrics_fn, ['mse', 'rmse', 'mae', 'rating_accuracy']),
                    (metrics.implicit_metrics_fn, ['bce', 'accuracy', 'auc'])):
    first, second = fn(), fn()
    assert [m.name for m in first] == names
    assert all(a is not b for a, b in zip(first, second))
    for m in first:  # what TFF's metric finalizers do
      clone = type(m).from_config(m.get_config())
      assert clone.get_config() == m.get_config()
  acc = metrics.RatingAccuracy(0.25)
  assert metrics.RatingAccuracy.from_config(acc.get_config()).threshold == 0.25


# ---------------------------------------------------------------------------
# Sampled (NCF) protocol.


def _table_score_fn(table):
  """score_fn reading scores[user, item] from a dense table."""
  table = np.asarray(table, np.float32)
  return lambda users, items: table[users, items]


def test_sampled_ranks_and_metrics_by_hand():
  scores = np.array([
      [9, 1, 2, 3, 4, 5],  # user 0: positive item 0 scores highest
      [0, 5, 7, 5, 1, 2],  # user 1: positive item 1 (5); item 2 higher, item 3 ties
      [1, 1, 1, 1, 1, 1],  # user 2: constant scores
  ])
  users = np.array([0, 1, 2])
  positives = np.array([0, 1, 5])
  negatives = np.array([[1, 2, 3, 4], [2, 3, 4, 5], [0, 1, 2, 3]])
  ranks = metrics.sampled_ranks(_table_score_fn(scores), users, positives, negatives)
  np.testing.assert_array_equal(ranks, [0, 2, 4])  # ties count against the positive
  out = metrics.hit_rate_and_ndcg_sampled(_table_score_fn(scores), users, positives, negatives, k=3)
  assert out['hit_rate'] == pytest.approx(2 / 3)
  assert out['ndcg'] == pytest.approx((1.0 + 1.0 / math.log2(4) + 0.0) / 3)
  out = metrics.hit_rate_and_ndcg_sampled(_table_score_fn(scores), users, positives, negatives, k=1)
  assert out == collections.OrderedDict(hit_rate=pytest.approx(1 / 3), ndcg=pytest.approx(1 / 3))


def test_sampled_repeats_and_positive_among_negatives():
  scores = np.array([[0, 5, 7, 5, 1, 2]])
  # Item 2 (above) listed twice, the positive itself listed once: rank 1 + tie with item 3.
  negatives = np.array([[2, 2, 1, 3]])
  ranks = metrics.sampled_ranks(_table_score_fn(scores), np.array([0]), np.array([1]), negatives)
  np.testing.assert_array_equal(ranks, [2])


def test_sampled_nan_scores_rank_last():
  def score_fn(users, items):
    return np.where(items == 0, np.nan, 0.0)
  ranks = metrics.sampled_ranks(score_fn, np.array([0]), np.array([0]), np.array([[1, 2, 3]]))
  np.testing.assert_array_equal(ranks, [3])


def test_sampled_batches_do_not_change_results():
  rng = np.random.default_rng(0)
  table = np.round(rng.normal(size=(30, 50)), 1)  # rounding makes ties
  users = rng.integers(0, 30, 40)
  positives = rng.integers(0, 50, 40)
  negatives = rng.integers(0, 50, (40, 9))
  a = metrics.sampled_ranks(_table_score_fn(table), users, positives, negatives)
  b = metrics.sampled_ranks(_table_score_fn(table), users, positives, negatives, batch_size=7)
  np.testing.assert_array_equal(a, b)
  # Against a direct per-case count.
  for j in range(40):
    others = set(negatives[j].tolist()) - {positives[j]}
    pos = np.float32(table[users[j], positives[j]])
    assert a[j] == sum(np.float32(table[users[j], o]) >= pos for o in others)


def test_sampled_checks_shapes():
  with pytest.raises(ValueError, match='negatives must be'):
    metrics.sampled_ranks(_table_score_fn(np.zeros((2, 2))), np.array([0]), np.array([1]),
                          np.array([0, 1]))
  with pytest.raises(ValueError, match='returned 1 scores for 3 pairs'):
    metrics.sampled_ranks(lambda u, i: np.zeros(1), np.array([0]), np.array([1]),
                          np.array([[0, 1]]))
  with pytest.raises(ValueError, match='positive integer'):
    metrics.hit_rate_and_ndcg_sampled(_table_score_fn(np.zeros((2, 2))), np.array([0]),
                                      np.array([1]), np.array([[0]]), k=0)


# ---------------------------------------------------------------------------
# Full ranking.


def _matrix_fn(table):
  table = np.asarray(table, np.float32)
  return lambda users: table[users]


HAND_TABLE = np.array([
    [10, 5, 9, 4, 8, 1],  # user 0
    [3, 3, 3, 3, 3, 3],  # user 1: constant
    [0, 0, 0, 0, 0, 0],  # user 2: no test items
])
HAND_TRAIN = (np.array([0, 2]), np.array([0, 1]))
HAND_TEST = (np.array([0, 0, 1]), np.array([1, 3, 5]))


def test_full_ranking_by_hand():
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), HAND_TRAIN, HAND_TEST, k=3)
  # User 0: item 0 excluded; item 1 (5) behind items 2 (9) and 4 (8): rank 2, a hit;
  # item 3 (4) also behind item 1: rank 3. User 1: item 5 ties with 5 others: rank 5.
  ndcg0 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
  assert out['hit_rate'] == pytest.approx(1 / 2)
  assert out['recall'] == pytest.approx((1 / 2 + 0) / 2)
  assert out['ndcg'] == pytest.approx(ndcg0 / 2)
  assert out['num_users'] == 2
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), HAND_TRAIN, HAND_TEST, k=4)
  ndcg0 = (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
  assert out['recall'] == pytest.approx(1 / 2)
  assert out['ndcg'] == pytest.approx(ndcg0 / 2)
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), HAND_TRAIN, HAND_TEST, k=6)
  assert out['hit_rate'] == 1.0 and out['recall'] == 1.0


def test_full_ranking_excludes_training_items():
  empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
  # Without the exclusion, item 0 (10) pushes item 1 to rank 3: no hit at k=3.
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), empty, HAND_TEST, k=3)
  assert out['hit_rate'] == 0.0
  # Training pairs of other users do not exclude anything for user 0.
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), (np.array([1]), np.array([0])),
                                     HAND_TEST, k=3)
  assert out['hit_rate'] == 0.0
  # A test pair that is also a training pair is scored, not excluded; [n, 2] arrays work.
  train = np.array([[0, 0], [0, 1]])
  out = metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), train, HAND_TEST, k=3)
  assert out['hit_rate'] == pytest.approx(1 / 2)


def _brute_force(table, train, test, k):
  """Per-user loop implementing the documented definition."""
  excl = collections.defaultdict(set)
  for u, i in zip(*train):
    excl[int(u)].add(int(i))
  tests = collections.defaultdict(set)
  for u, i in zip(*test):
    tests[int(u)].add(int(i))
  hr, ndcg, recall = [], [], []
  for u, t_items in sorted(tests.items()):
    s = table[u]
    cands = [i for i in range(table.shape[1]) if i not in excl[u] or i in t_items]
    # Sorted by score desc; ties: non-test first, then test items by id.
    order = sorted(cands, key=lambda i: (-s[i], i in t_items, i))
    ranks = [order.index(t) for t in t_items]
    hits = [r for r in ranks if r < k]
    hr.append(float(bool(hits)))
    recall.append(len(hits) / len(t_items))
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(t_items), k)))
    ndcg.append(sum(1 / math.log2(r + 2) for r in hits) / idcg)
  return np.mean(hr), np.mean(ndcg), np.mean(recall)


@pytest.mark.parametrize('k', [1, 5, 40])
def test_full_ranking_matches_brute_force(k):
  rng = np.random.default_rng(k)
  num_users, num_items = 25, 30
  table = np.round(rng.normal(size=(num_users, num_items)), 1).astype(np.float32)
  table[3] = 0.0  # all ties
  table[4, :5] = np.nan
  train = (rng.integers(0, num_users, 200), rng.integers(0, num_items, 200))
  test = (rng.integers(0, num_users - 2, 60), rng.integers(0, num_items, 60))
  expected = _brute_force(np.where(np.isnan(table), -np.inf, table), train, test, k)
  for chunk in (1, 4, 1024):
    out = metrics.full_ranking_metrics(_matrix_fn(table), train, test, k=k, chunk_size=chunk)
    np.testing.assert_allclose([out['hit_rate'], out['ndcg'], out['recall']], expected, rtol=1e-9)


def test_full_ranking_checks_inputs():
  with pytest.raises(ValueError, match='out of range'):
    metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), HAND_TRAIN, (np.array([0]), np.array([6])))
  with pytest.raises(ValueError, match='empty'):
    metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), HAND_TRAIN, (np.array([], int),) * 2)
  with pytest.raises(ValueError, match=r'\[n, 2\]'):
    metrics.full_ranking_metrics(_matrix_fn(HAND_TABLE), np.zeros((3, 3), int), HAND_TEST)
  with pytest.raises(ValueError, match='shape'):
    metrics.full_ranking_metrics(lambda u: np.zeros(6), HAND_TRAIN, HAND_TEST)


def test_keras_scoring_callables_match_the_model():
  inputs = {'user': tf.keras.Input((), dtype=tf.int32, name='user'),
            'item': tf.keras.Input((), dtype=tf.int32, name='item')}
  out = tf.keras.layers.Lambda(lambda x: tf.cast(x['user'] * 10 + x['item'], tf.float32))(inputs)
  model = tf.keras.Model(inputs, out)
  score = metrics.keras_score_fn(model, batch_size=3)
  np.testing.assert_array_equal(score(np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])),
                                [15, 26, 37, 48])
  matrix = metrics.keras_score_matrix_fn(model, num_items=4, batch_size=5)(np.array([2, 0]))
  np.testing.assert_array_equal(matrix, [[20, 21, 22, 23], [0, 1, 2, 3]])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
