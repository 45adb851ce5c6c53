"""Evaluation metrics: Keras metrics for TFF, and numpy top-K ranking protocols.

Rating metrics follow the toolkit's one clipping rule (no metric clips; see
`tff_rec.models.predictions`). Keras metrics average per example: Keras' built-in `MeanSquaredError`,
`MeanAbsoluteError` and `BinaryCrossentropy` first average over the last
axis, which for our float32[B] predictions makes them per-batch averages
(a short last batch would weigh as much as a full one). They take no
required arguments and round-trip through `get_config`, as TFF's metric
finalizers need.

Ranking metrics are pure functions of numpy arrays and a scoring callable:
- `hit_rate_and_ndcg_sampled`: the NCF protocol (one held-out positive
  ranked among its sampled negatives);
- `full_ranking_metrics`: HR, NDCG and Recall at K over all items, each
  user's training items excluded.
Ranks are 0-based and pessimistic: a test item is placed after every
competitor with an equal score, so ties (e.g. a constant model) never count
as hits by luck. NaN scores count as -inf.
"""

from __future__ import annotations

import collections
from typing import Callable, Union

import numpy as np
import tensorflow as tf

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (users[n], items[n]) -> scores[n]
ScoreMatrixFn = Callable[[np.ndarray], np.ndarray]  # users[b] -> scores[b, num_items]
Pairs = Union[tuple[np.ndarray, np.ndarray], np.ndarray]  # (users, items) or int[n, 2]


# ----------------------------------------------------------------------------
# Keras metrics (usable in TFF).


class _ExampleMean(tf.keras.metrics.Mean):
  """Mean over examples of a per-example value of (y_true, y_pred)."""

  def _values(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    raise NotImplementedError

  def update_state(self, y_true, y_pred, sample_weight=None):  # pylint: disable=arguments-differ
    y_true = tf.reshape(tf.cast(y_true, self.dtype), [-1])
    y_pred = tf.reshape(tf.cast(y_pred, self.dtype), [-1])
    if sample_weight is not None:
      sample_weight = tf.reshape(tf.cast(sample_weight, self.dtype), [-1])
    return super().update_state(self._values(y_true, y_pred), sample_weight=sample_weight)


class MeanSquaredError(_ExampleMean):
  """Mean of (y_pred - y_true)**2 over examples."""

  def __init__(self, name: str = 'mse', dtype=None):
    super().__init__(name=name, dtype=dtype)

  def _values(self, y_true, y_pred):
    return tf.math.squared_difference(y_pred, y_true)


class RootMeanSquaredError(MeanSquaredError):
  """Square root of the mean squared error over examples."""

  def __init__(self, name: str = 'rmse', dtype=None):
    super().__init__(name=name, dtype=dtype)

  def result(self):
    return tf.sqrt(super().result())


class MeanAbsoluteError(_ExampleMean):
  """Mean of |y_pred - y_true| over examples."""

  def __init__(self, name: str = 'mae', dtype=None):
    super().__init__(name=name, dtype=dtype)

  def _values(self, y_true, y_pred):
    return tf.abs(y_pred - y_true)


class RatingAccuracy(_ExampleMean):
  """Fraction of examples with |y_pred - y_true| <= threshold.

  As FedRecon's `ReconstructionAccuracyMetric` (threshold 0.5). Predictions are
  not clipped: no metric clips (tff_rec/models/predictions.py).
  """

  def __init__(self, threshold: float = 0.5, name: str = 'rating_accuracy', dtype=None):
    super().__init__(name=name, dtype=dtype)
    self.threshold = float(threshold)

  def _values(self, y_true, y_pred):
    return tf.cast(tf.abs(y_pred - y_true) <= self.threshold, self.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(threshold=self.threshold)
    return config


class BinaryCrossentropyFromLogits(_ExampleMean):
  """Mean binary cross-entropy of 0/1 labels given logits."""

  def __init__(self, name: str = 'bce', dtype=None):
    super().__init__(name=name, dtype=dtype)

  def _values(self, y_true, y_pred):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred)


class LogitAccuracy(_ExampleMean):
  """Fraction of examples with (logit > 0) == (label > 0.5)."""

  def __init__(self, name: str = 'accuracy', dtype=None):
    super().__init__(name=name, dtype=dtype)

  def _values(self, y_true, y_pred):
    return tf.cast(tf.equal(y_pred > 0.0, y_true > 0.5), self.dtype)


def rating_metrics_fn() -> list[tf.keras.metrics.Metric]:
  """Fresh metrics for rating prediction: MSE, RMSE, MAE, accuracy within 0.5."""
  return [MeanSquaredError(), RootMeanSquaredError(), MeanAbsoluteError(), RatingAccuracy(0.5)]


def implicit_metrics_fn() -> list[tf.keras.metrics.Metric]:
  """Fresh metrics for 0/1 labels scored by logits: BCE, accuracy, AUC."""
  return [
      BinaryCrossentropyFromLogits(),
      LogitAccuracy(),
      tf.keras.metrics.AUC(from_logits=True, name='auc'),
  ]


# ----------------------------------------------------------------------------
# Ranking evaluation (numpy).


def _ndcg_gain(ranks: np.ndarray, k: int) -> np.ndarray:
  return np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)


def _finite_or_low(scores: np.ndarray) -> np.ndarray:
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  return np.where(np.isnan(scores), -np.inf, scores)


def _check_k(k: int) -> int:
  if int(k) != k or k < 1:
    raise ValueError(f'k must be a positive integer, got {k}')
  return int(k)


def sampled_ranks(
    score_fn: ScoreFn,
    users: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    batch_size: int = 262144,
) -> np.ndarray:
  """0-based rank of each positive among its sampled negatives (NCF protocol).

  rank[j] = number of distinct items in `negatives[j]`, other than
  `positives[j]` itself, scoring >= the positive (ties count against it).
  Repeated items and a negative equal to the positive count once / not at
  all, as in the NCF code's item -> score map. `score_fn(users, items)`
  scores flat int arrays; it is called on about `batch_size` pairs at a time.
  """
  users = np.asarray(users)
  positives = np.asarray(positives)
  negatives = np.asarray(negatives)
  if users.ndim != 1 or positives.shape != users.shape:
    raise ValueError(
        f'users and positives must be 1-D of equal length, got {users.shape} and {positives.shape}')
  if negatives.ndim != 2 or negatives.shape[0] != users.shape[0]:
    raise ValueError(f'negatives must be [{users.shape[0]}, N], got {negatives.shape}')
  n, num_neg = negatives.shape
  items = np.concatenate([positives[:, None], negatives], axis=1)
  rows = max(1, batch_size // (num_neg + 1))
  scores = np.empty(items.shape, np.float64)
  for s in range(0, n, rows):
    block = items[s:s + rows]
    u = np.repeat(users[s:s + rows], num_neg + 1)
    out = np.asarray(score_fn(u.astype(np.int32), block.reshape(-1).astype(np.int32)))
    if out.size != block.size:
      raise ValueError(f'score_fn returned {out.size} scores for {block.size} pairs')
    scores[s:s + rows] = _finite_or_low(out.reshape(block.shape))
  # Count each distinct negative once, and never the positive itself.
  order = np.argsort(negatives, axis=1, kind='stable')
  sorted_ids = np.take_along_axis(negatives, order, axis=1)
  repeat_sorted = np.zeros_like(sorted_ids, dtype=bool)
  repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
  repeat = np.empty_like(repeat_sorted)
  np.put_along_axis(repeat, order, repeat_sorted, axis=1)
  counted = ~repeat & (negatives != positives[:, None])
  return np.sum(counted & (scores[:, 1:] >= scores[:, :1]), axis=1)


def hit_rate_and_ndcg_sampled(
    score_fn: ScoreFn,
    users: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    k: int = 10,
) -> collections.OrderedDict:
  """NCF's HR@k and NDCG@k: the positive among its negatives (e.g. 99).

  Per test case, hit = rank < k and NDCG = 1 / log2(rank + 2) if a hit else 0
  (`sampled_ranks` defines rank and the tie rule); both averaged over cases.
  """
  k = _check_k(k)
  ranks = sampled_ranks(score_fn, users, positives, negatives)
  if ranks.size == 0:
    raise ValueError('no test cases to evaluate')
  return collections.OrderedDict(
      hit_rate=float(np.mean(ranks < k)),
      ndcg=float(np.mean(_ndcg_gain(ranks, k))),
  )


def _as_pairs(pairs: Pairs, what: str) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(pairs, tuple):
    users, items = (np.asarray(a).reshape(-1) for a in pairs)
  else:
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2:
      raise ValueError(f'{what} must be (users, items) or an int array [n, 2], got {arr.shape}')
    users, items = arr[:, 0], arr[:, 1]
  if users.shape != items.shape:
    raise ValueError(f'{what}: {users.size} users but {items.size} items')
  if users.size and not (np.issubdtype(users.dtype, np.integer)
                         and np.issubdtype(items.dtype, np.integer)):
    raise ValueError(f'{what} must hold integer indices')
  return users.astype(np.int64), items.astype(np.int64)


def full_ranking_metrics(
    score_matrix_fn: ScoreMatrixFn,
    train_pairs_to_exclude: Pairs,
    test_pairs: Pairs,
    k: int = 10,
    chunk_size: int = 1024,
) -> collections.OrderedDict:
  """HR@k, NDCG@k and Recall@k over all items, averaged over test users.

  For each user with test items, `score_matrix_fn(users)` scores every item;
  the user's training items (pairs in `train_pairs_to_exclude` that are not
  also test pairs) are removed from the candidates. A test item's rank is its
  position in the user's list sorted by score, ties placing it after
  non-test items and after test items with lower ids. Per user:
  hit = any test item ranked < k; recall = hits / number of test items;
  NDCG = sum over hits of 1/log2(rank + 2), over the ideal DCG of
  min(number of test items, k) hits. Users are scored `chunk_size` at a time.
  """
  k = _check_k(k)
  t_users, t_items = _as_pairs(test_pairs, 'test_pairs')
  x_users, x_items = _as_pairs(train_pairs_to_exclude, 'train_pairs_to_exclude')
  if t_users.size == 0:
    raise ValueError('test_pairs is empty')
  if min(t_users.min(), t_items.min()) < 0 or (
      x_users.size and min(x_users.min(), x_items.min()) < 0):
    raise ValueError('user and item indices must be non-negative')
  # Unique test pairs sorted by user; eval users in that order.
  width = int(t_items.max()) + 1
  key = np.unique(t_users * width + t_items)
  t_users, t_items = key // width, key % width
  eval_users, t_start = np.unique(t_users, return_index=True)
  t_end = np.append(t_start[1:], t_users.size)
  # Training pairs of evaluated users, by the row of their user.
  x_row = np.searchsorted(eval_users, x_users)
  found = eval_users[np.minimum(x_row, eval_users.size - 1)] == x_users
  in_eval = (x_row < eval_users.size) & found
  x_row, x_items = x_row[in_eval], x_items[in_eval]
  order = np.argsort(x_row, kind='stable')
  x_row, x_items = x_row[order], x_items[order]

  hits = np.zeros(eval_users.size)
  dcg = np.zeros(eval_users.size)
  num_items = None
  for c0 in range(0, eval_users.size, chunk_size):
    c1 = min(c0 + chunk_size, eval_users.size)
    scores = _finite_or_low(score_matrix_fn(eval_users[c0:c1].astype(np.int32)))
    if scores.ndim != 2 or scores.shape[0] != c1 - c0:
      raise ValueError(f'score_matrix_fn returned shape {scores.shape} for {c1 - c0} users')
    if num_items is None:
      num_items = scores.shape[1]
      if t_items.max() >= num_items or (x_items.size and x_items.max() >= num_items):
        raise ValueError(f'item index out of range for {num_items} scored items')
    # Test pairs of this chunk: local row, item, score.
    p0, p1 = t_start[c0], t_end[c1 - 1]
    rows = np.repeat(np.arange(c1 - c0), t_end[c0:c1] - t_start[c0:c1])
    items = t_items[p0:p1]
    s_test = scores[rows, items]
    # Candidates that are not test items: drop training and test items.
    is_cand = np.ones(scores.shape, bool)
    lo, hi = np.searchsorted(x_row, [c0, c1])
    is_cand[x_row[lo:hi] - c0, x_items[lo:hi]] = False
    is_cand[rows, items] = False
    n_cand = is_cand.sum(axis=1)
    kk = min(k, num_items)
    masked = np.where(is_cand, scores, -np.inf)
    top = -np.partition(-masked, kk - 1, axis=1)[:, :kk]  # the kk highest, unordered
    # Non-test candidates scoring >= the test item, capped at k (exact below k).
    ahead = np.minimum(np.sum(top[rows] >= s_test[:, None], axis=1), n_cand[rows])
    # Test items of the same user ahead of it: higher score, or equal and lower id.
    order = np.lexsort((items, -s_test, rows))
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    first = np.searchsorted(rows[order], rows)
    ranks = ahead + (pos - first)
    hit = ranks < k
    hits[c0:c1] = np.bincount(rows, weights=hit.astype(np.float64), minlength=c1 - c0)
    dcg[c0:c1] = np.bincount(rows, weights=_ndcg_gain(ranks, k), minlength=c1 - c0)
  n_test = (t_end - t_start).astype(np.float64)
  ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(n_test, k).astype(int) - 1]
  return collections.OrderedDict(
      hit_rate=float(np.mean(hits > 0)),
      ndcg=float(np.mean(dcg / ideal)),
      recall=float(np.mean(hits / n_test)),
      num_users=int(eval_users.size),
  )


# ----------------------------------------------------------------------------
# Scoring callables for Keras models.


def keras_score_fn(keras_model: tf.keras.Model, batch_size: int = 65536) -> ScoreFn:
  """`score_fn(users, items)` from a pointwise model, in batches of pairs."""

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)] * 2)
  def predict(users, items):
    return keras_model(collections.OrderedDict(user=users, item=items), training=False)

  def fn(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    users = np.asarray(users, np.int32)
    items = np.asarray(items, np.int32)
    out = [predict(users[s:s + batch_size], items[s:s + batch_size]).numpy()
           for s in range(0, users.size, batch_size)]
    return np.concatenate(out) if out else np.zeros([0], np.float32)

  return fn


def keras_score_matrix_fn(keras_model: tf.keras.Model, num_items: int,
                          batch_size: int = 65536) -> ScoreMatrixFn:
  """`score_matrix_fn(users)` scoring every item with a pointwise model."""
  score = keras_score_fn(keras_model, batch_size)
  all_items = np.arange(num_items, dtype=np.int32)

  def fn(users: np.ndarray) -> np.ndarray:
    users = np.asarray(users, np.int32)
    flat = score(np.repeat(users, num_items), np.tile(all_items, users.size))
    return flat.reshape(users.size, num_items)

  return fn
