"""Rating prediction and rating metrics: the one clipping rule of the toolkit.

The rule. **A rating metric scores the value the evaluated artifact produces,
and no metric clips.** A Keras model (central, federated, reconstructed on a
client, pruned or quantized) produces its raw output, so its RMSE, MAE, MSE
and rating accuracy are of that output, as in TFF's and Federated
Reconstruction's metrics (`tff_rec.models.metrics`, which run inside TFF
computations and follow the same rule). The one place a prediction is
clipped to the dataset's rating scale is the exported SavedModel's
`prediction` output (`tff_rec.export.serving`, through `clip_to_scale`),
because that is what a user receives; an evaluation of an export therefore
scores clipped values, and says so.

Published comparisons whose reference clips (Surprise's benchmark does)
state the difference in their table notes rather than clipping here: a
clipped RMSE is never higher, so ours are the conservative figures.

Every numpy-side rating evaluation goes through `predict` and
`rating_metrics`; `tests/models/predictions_test.py` checks the rule, and
`tests/layering_test.py` that no other module defines its own copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

# The rule's name, recorded in the parameters of table cells whose numbers it
# defines (a change of rule re-keys them instead of mixing results).
RULE = 'unclipped'


def predict(model: tf.keras.Model, users: np.ndarray, items: np.ndarray, *,
            batch_size: int = 65536) -> np.ndarray:
  """The model's raw outputs for (user, item) pairs, in large batches.

  Args:
    model: A Keras model taking {'user': int32[B], 'item': int32[B]}.
    users: Dense user indices, int[n].
    items: Dense item indices, int[n].
    batch_size: Pairs per call.

  Returns:
    float32[n], unclipped.

  Raises:
    ValueError: `users` and `items` differ in length.
  """
  users = np.asarray(users)
  items = np.asarray(items)
  if users.shape != items.shape:
    raise ValueError(f'users {users.shape} and items {items.shape} must have the same shape')
  out = [np.asarray(model({'user': tf.constant(users[s:s + batch_size], tf.int32),
                           'item': tf.constant(items[s:s + batch_size], tf.int32)},
                          training=False), np.float32).reshape([-1])
         for s in range(0, len(users), batch_size)]
  return np.concatenate(out) if out else np.zeros([0], np.float32)


def rating_metrics(predictions: np.ndarray, ratings: np.ndarray) -> dict:
  """RMSE, MAE, MSE and rating accuracy (|error| <= 0.5) of predictions, as given.

  Args:
    predictions: float[n] predicted ratings (not clipped here; see the
      module docstring).
    ratings: float[n] true ratings.

  Returns:
    {'rmse', 'mae', 'mse', 'rating_accuracy', 'num_examples'}.

  Raises:
    ValueError: Different lengths, no examples, or a non-finite prediction
      (a NaN model must not produce a plausible-looking number).
  """
  p = np.asarray(predictions, np.float64).reshape([-1])
  r = np.asarray(ratings, np.float64).reshape([-1])
  if p.shape != r.shape:
    raise ValueError(f'{p.size} predictions for {r.size} ratings')
  if p.size == 0:
    raise ValueError('rating metrics of no examples')
  if not np.all(np.isfinite(p)):
    raise ValueError(f'{int(np.sum(~np.isfinite(p)))} of {p.size} predictions are not finite')
  err = p - r
  return {
      'rmse': float(np.sqrt(np.mean(err ** 2))),
      'mae': float(np.mean(np.abs(err))),
      'mse': float(np.mean(err ** 2)),
      'rating_accuracy': float(np.mean(np.abs(err) <= 0.5)),
      'num_examples': int(err.size),
  }


def clip_to_scale(scores: tf.Tensor, scale: Sequence[float]) -> tf.Tensor:
  """A served rating: the score clipped to the rating scale (exports only).

  Args:
    scores: Raw model scores.
    scale: (lowest, highest) rating of the dataset.

  Returns:
    The scores clipped to [lowest, highest].

  Raises:
    ValueError: `scale` is not (low, high) with low <= high.
  """
  low, high = (float(s) for s in scale)
  if not low <= high:
    raise ValueError(f'rating scale must be (low, high) with low <= high, got {tuple(scale)}')
  return tf.clip_by_value(scores, low, high)
