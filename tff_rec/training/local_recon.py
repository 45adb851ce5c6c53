"""Federated Reconstruction's on-device reconstruction, simulated for many users at once.

Evaluating a FedRecon model on a user means: start the user's local
(user-side) variables from their initial value, take a few SGD steps on the
user's support data with the global (item-side) variables frozen, then score.
TFF's `build_fed_recon_eval` does this per client and returns aggregate
metrics only. The tables also need what TFF does not give: per-user losses
(membership inference) and top-K ranking of a held-out item among sampled
negatives (NCF). `reconstruct` takes exactly the steps every device would
take, for all users in one vectorized loop: step k updates each user's rows
with the gradient of the mean loss over that user's k-th batch (plus the
rows' L2 term, as `EmbeddingLookup` applies it per device), so it matches
the per-client computation (tests/reproduce/local_recon_test.py checks it
against TFF's evaluation).

Support data and steps follow TFF's dataset split function
(`ReconstructionModel.build_dataset_split_fn`): batches in the evaluation
order (by user, time, item), even-indexed batches reconstruct and
odd-indexed batches are scored (`split_dataset=True`), the reconstruction
batches repeated `recon_epochs` times and cut at `recon_steps_max` steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import tensorflow as tf

from tff_rec.data import centralized
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@dataclasses.dataclass(frozen=True)
class ReconRows:
  """Support rows of many users, each tagged with its reconstruction step."""

  users: np.ndarray  # int32
  items: np.ndarray  # int32
  labels: np.ndarray  # float32
  steps: np.ndarray  # int64, 0-based step at which the row is used

  @property
  def num_steps(self) -> int:
    return int(self.steps.max()) + 1 if self.steps.size else 0


def _positions(users: np.ndarray) -> np.ndarray:
  """Position of each row within its user's run (rows grouped by user)."""
  if users.size == 0:
    return np.zeros(0, np.int64)
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  run_start = np.repeat(starts, np.diff(np.r_[starts, users.size]))
  return np.arange(users.size) - run_start


def support_query_split(r: ratings_lib.Ratings, batch_size: int,
                        post_recon_steps_max: Optional[int] = None
                        ) -> tuple[ratings_lib.Ratings, ratings_lib.Ratings]:
  """(support, query) of every user: even / odd batches in evaluation order.

  The order is `Ratings.sorted_by_user()` (user, time, item), as in
  `federated.make_eval_dataset_fn`; `post_recon_steps_max` keeps only the
  first that many query batches of each user.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  s = r.sorted_by_user()
  batch = _positions(s.users) // batch_size
  support = batch % 2 == 0
  query = ~support
  if post_recon_steps_max is not None:
    query &= (batch // 2) < post_recon_steps_max
  return (s.select(support, name=f'{r.name}/support'), s.select(query, name=f'{r.name}/query'))


def _schedule(users, items, labels, batch_size: int, epochs: int,
              steps_max: Optional[int]) -> ReconRows:
  """Rows grouped by user (in batch order) repeated `epochs` times, stepped."""
  if epochs <= 0:
    raise ValueError(f'epochs must be positive, got {epochs}')
  batch = _positions(users) // batch_size
  counts = np.bincount(users, minlength=int(users.max()) + 1 if users.size else 0)
  num_batches = -(-counts // batch_size)  # ceil
  parts = []
  for epoch in range(epochs):
    steps = epoch * num_batches[users] + batch
    keep = steps < steps_max if steps_max is not None else np.ones(steps.shape, bool)
    parts.append((users[keep], items[keep], labels[keep], steps[keep]))
  cat = [np.concatenate(p) for p in zip(*parts)]
  order = np.argsort(cat[3], kind='stable')
  return ReconRows(cat[0][order].astype(np.int32), cat[1][order].astype(np.int32),
                   cat[2][order].astype(np.float32), cat[3][order].astype(np.int64))


def rating_support_rows(support: ratings_lib.Ratings, batch_size: int, recon_epochs: int = 1,
                        recon_steps_max: Optional[int] = None) -> ReconRows:
  """Reconstruction rows of rating models from `support_query_split`'s support.

  Support rows are whole even batches (only a user's last batch can be
  short), so consecutive groups of `batch_size` rows are the batches.
  """
  s = support.sorted_by_user()
  return _schedule(s.users, s.items, s.ratings, batch_size, recon_epochs, recon_steps_max)


def implicit_support_rows(train: ratings_lib.Ratings, negatives_per_positive: int,
                          batch_size: int, recon_epochs: int = 1,
                          recon_steps_max: Optional[int] = None, seed: int = 0) -> ReconRows:
  """Reconstruction rows of implicit models: each user's positives (label 1)
  and `negatives_per_positive` sampled unrated items (label 0) per positive,
  shuffled within the user and batched, as a training client's data."""
  if negatives_per_positive <= 0:
    raise ValueError('implicit reconstruction needs negatives_per_positive > 0')
  users, items, labels = centralized.arrays(train, negatives_per_positive, seed)
  rng = np.random.default_rng([seed, 17])
  order = np.lexsort((rng.random(users.size), users))
  return _schedule(users[order], items[order], labels[order], batch_size, recon_epochs,
                   recon_steps_max)


def _per_example_loss(task: str):
  if task == base.TASK_RATING:
    return lambda y, p: tf.square(p - y)
  if task == base.TASK_IMPLICIT:
    return lambda y, p: tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=p)
  raise ValueError(f'unknown task {task!r}')


def reconstruct(spec: model_fns.ModelSpec, source: tf.keras.Model, rows: ReconRows,
                optimizer: optimizers.OptimizerConfig) -> tf.keras.Model:
  """A user-table model: global layers from `source`, user rows reconstructed.

  `source` is any variant of the model (e.g. a FedRecon run's final model)
  holding the trained global layers under their usual names. Every user row
  starts from the initial value of the on-device row (`spec.build(LOCAL)`)
  and takes the SGD steps of `rows`; users without rows keep that value.
  """
  if optimizer.name != 'sgd' or optimizer.schedule != 'constant':
    raise ValueError('reconstruction is simulated for constant-rate SGD only, got '
                     f'{optimizer.name} / {optimizer.schedule}')
  personal = spec.build(model_fns.UserEmbedding.LOCAL)
  hparams = dict(getattr(spec.builder, 'keywords', {}))
  l2 = float(hparams.get('l2', 0.0) or 0.0)
  # The L2 gradient is added per user below; the layer's own (per batch) is off.
  builder = functools.partial(spec.builder, l2=0.0) if 'l2' in hparams else spec.builder
  table = dataclasses.replace(spec, builder=builder).build(model_fns.UserEmbedding.TABLE)
  model = table.keras_model
  local_names = [layer.name for layer in personal.local_layers]
  for layer in model.layers:
    if not layer.weights:
      continue
    if layer.name in local_names:
      row = personal.keras_model.get_layer(layer.name).get_weights()[0]
      layer.set_weights([np.repeat(row[:1], layer.get_weights()[0].shape[0], axis=0)])
    else:
      layer.set_weights(source.get_layer(layer.name).get_weights())
  user_vars = [model.get_layer(n).embeddings for n in local_names]
  loss = _per_example_loss(spec.task)
  lr = float(optimizer.learning_rate)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)] * 2
               + [tf.TensorSpec([None], tf.float32)] * 2 + [tf.TensorSpec([None], tf.int32)])
  def step(users, items, labels, weights, active):
    with tf.GradientTape() as tape:
      pred = model({'user': users, 'item': items}, training=True)
      total = tf.reduce_sum(weights * loss(labels, tf.cast(pred, tf.float32)))
      if l2:
        total += l2 * tf.add_n([tf.reduce_sum(tf.square(tf.gather(v, active))) for v in user_vars])
    grads = tape.gradient(total, user_vars)
    for v, g in zip(user_vars, grads):
      v.assign_sub(lr * tf.convert_to_tensor(g))

  bounds = np.searchsorted(rows.steps, np.arange(rows.num_steps + 1))
  for k in range(rows.num_steps):
    lo, hi = bounds[k], bounds[k + 1]
    if lo == hi:
      continue
    u = rows.users[lo:hi]
    active, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    weights = (1.0 / counts[inverse]).astype(np.float32)  # mean over each user's batch
    step(u, rows.items[lo:hi], rows.labels[lo:hi], weights, active.astype(np.int32))
  return model


