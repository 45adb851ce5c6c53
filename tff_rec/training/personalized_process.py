"""What personalized federated recommenders share: client inputs, on-device ranking, the process.

A personalized round: broadcast the global item table (and the round
number), train on every client from its device state, aggregate the table
updates with any unweighted `tff.aggregators` factory, apply them with
`build_apply_optimizer_finalizer` (SGD 1.0, a plain replacement by the
mean), and evaluate on the devices. `next` returns
`OrderedDict(state, personal, metrics)`: the device states stay CLIENTS
placed and only scalar metric sums reach the server.

The client work is not a `tff.learning.templates.ClientWorkProcess`: that
template returns a `ClientResult` and SERVER measurements only, while a
personalized client must also return its new device state.

The loss is PyTorch's `BCELoss` on sigmoid outputs, as in the reference
implementations (PFedRec, FedRAP): its backward pass returns zero once
float32 sigmoid saturates at 1.0 and damps gradients where p(1-p) falls
below its 1e-12 clamp, which matters at the item learning rates these
papers use, so the gradient is written out (`bce_logit_grad`).
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

TRAIN_SUMS = ('loss_sum', 'num_examples', 'num_clients', 'non_finite_updates')
EVAL_SUMS = ('val_hit', 'val_ndcg', 'test_hit', 'test_ndcg',
             'val_full_hit', 'val_full_ndcg', 'test_full_hit', 'test_full_ndcg')
METRIC_SUMS = TRAIN_SUMS + EVAL_SUMS
# torch.nn.BCELoss clamps its denominator at this epsilon (aten/src/ATen/native/Loss.cpp).
_TORCH_BCE_EPS = 1e-12


def data_type() -> tff.StructType:
  """One client's round input: its shuffled examples and its held-out items."""
  return tff.to_type(collections.OrderedDict(
      items=tff.TensorType(np.int32, [None]),
      labels=tff.TensorType(np.float32, [None]),
      train_items=tff.TensorType(np.int32, [None]),
      val_item=tff.TensorType(np.int32),
      val_negatives=tff.TensorType(np.int32, [None]),
      test_item=tff.TensorType(np.int32),
      test_negatives=tff.TensorType(np.int32, [None])))


def bce_logit_grad(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """d mean(BCELoss(sigmoid(x), y)) / dx, as PyTorch's backward computes it."""
  p = tf.sigmoid(logits)
  p1 = p * (1.0 - p)
  n = tf.cast(tf.size(labels), tf.float32)
  return (p - labels) / tf.maximum(p1, _TORCH_BCE_EPS) * ((1.0 - p) * p) / n


def bce_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """mean BCELoss(sigmoid(x), y) with PyTorch's log clamp at -100."""
  p = tf.sigmoid(logits)
  log_p = tf.maximum(tf.math.log(p), -100.0)
  log_q = tf.maximum(tf.math.log(1.0 - p), -100.0)
  return -tf.reduce_mean(labels * log_p + (1.0 - labels) * log_q)


def _rank_gain(rank, k: int):
  hit = tf.cast(rank < k, tf.float32)
  return hit, hit / (tf.math.log(tf.cast(rank, tf.float32) + 2.0) / math.log(2.0))


def device_metrics(probs: tf.Tensor, data, num_items: int, k: int) -> dict:
  """HR@k and NDCG@k of the val and test items, sampled and full ranking.

  Sampled: the held-out item against its negatives. Full: against every
  item outside the user's training set, other than itself. A rank counts
  the candidates with probability >= the item's (ties against it, as the
  references' `rank(method='first')` with negatives listed first).
  """
  out = {}
  not_train = tf.tensor_scatter_nd_update(
      tf.ones([num_items], tf.bool), data['train_items'][:, None],
      tf.zeros_like(data['train_items'], tf.bool))
  for part in ('val', 'test'):
    target = data[f'{part}_item']
    p = probs[target]
    negs = tf.gather(probs, data[f'{part}_negatives'])
    rank = tf.reduce_sum(tf.cast(negs >= p, tf.int32))
    out[f'{part}_hit'], out[f'{part}_ndcg'] = _rank_gain(rank, k)
    cand = tf.tensor_scatter_nd_update(not_train, target[None, None], [False])
    full_rank = tf.reduce_sum(tf.cast(tf.logical_and(cand, probs >= p), tf.int32))
    out[f'{part}_full_hit'], out[f'{part}_full_ndcg'] = _rank_gain(full_rank, k)
  return out


def zero_if_not_finite(delta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(delta or zeros, 1.0 if it was not finite else 0.0)."""
  finite = tf.reduce_all(tf.math.is_finite(delta))
  return tf.where(finite, delta, tf.zeros_like(delta)), 1.0 - tf.cast(finite, tf.float32)


def _finalize_metrics(sums):
  n = tf.maximum(sums['num_clients'], 1.0)
  out = collections.OrderedDict(
      loss=sums['loss_sum'] / tf.maximum(sums['num_examples'], 1.0),
      num_clients=sums['num_clients'], num_examples=sums['num_examples'],
      non_finite_updates=sums['non_finite_updates'])
  for k in EVAL_SUMS:
    out[k.replace('_hit', '_hr')] = sums[k] / n
  return out


def weights_type(table_shape) -> tff.Type:
  return tff.to_type(tff.learning.models.ModelWeights(
      trainable=(tff.TensorType(np.float32, table_shape),), non_trainable=()))


def build_process(*, initial_table: np.ndarray, personal_type: tff.Type, client_train,
                  client_eval=None,
                  model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
                  algorithm: str = 'a personalized algorithm') -> tff.templates.IterativeProcess:
  """The personalized round as a TFF iterative process.

  Args:
    initial_table: The global item table before round 1.
    personal_type: The TFF type of one device state.
    client_train: A `tff.tensorflow.computation` (global weights, round
      number int32, OrderedDict(personal, data)) -> (ClientResult, new device
      state, OrderedDict of sums). The sums are `TRAIN_SUMS`, plus `EVAL_SUMS`
      when `client_eval` is None.
    client_eval: None, or a `tff.tensorflow.computation` (new global weights,
      new device state, data) -> OrderedDict of `EVAL_SUMS`, run after the
      server update.
    model_aggregator: An unweighted `tff.aggregators` factory for the table
      updates (default `UnweightedMeanFactory`, a uniform mean).
    algorithm: Its name, for error messages.

  Returns:
    `tff.templates.IterativeProcess`: `initialize() -> state`,
    `next(state, clients) -> OrderedDict(state, personal@CLIENTS, metrics)`.

  Raises:
    TypeError: a weighted aggregation factory.
  """
  if model_aggregator is None:
    model_aggregator = tff.aggregators.UnweightedMeanFactory()
  if not isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(f'{algorithm} averages uniformly: model_aggregator must be a '
                    f'tff.aggregators.UnweightedAggregationFactory, got {type(model_aggregator)}')
  w_type = weights_type(initial_table.shape)
  client_type = tff.to_type(collections.OrderedDict(personal=personal_type, data=data_type()))
  distributor = tff.learning.templates.build_broadcast_process(w_type)
  aggregator = model_aggregator.create(w_type.trainable)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      tff.learning.optimizers.build_sgdm(learning_rate=1.0), w_type)

  @tff.tensorflow.computation
  def initial_weights():
    return tff.learning.models.ModelWeights(trainable=(tf.constant(initial_table),),
                                            non_trainable=())

  @tff.tensorflow.computation
  def zero_round():
    return tf.constant(0, tf.int32)

  @tff.federated_computation
  def initialize():
    return tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        global_model_weights=tff.federated_eval(initial_weights, tff.SERVER),
        distributor=distributor.initialize(),
        client_work=tff.federated_eval(zero_round, tff.SERVER),
        aggregator=aggregator.initialize(), finalizer=finalizer.initialize()))

  state_type = initialize.type_signature.result

  @tff.tensorflow.computation(tff.TensorType(np.int32))
  def increment(r):
    return r + 1

  @tff.tensorflow.computation
  def merge(train_sums, eval_sums):
    out = collections.OrderedDict(train_sums)
    out.update(eval_sums)
    return out

  @tff.federated_computation(state_type, tff.FederatedType(client_type, tff.CLIENTS))
  def next_fn(state, clients):
    broadcast = distributor.next(state.distributor, state.global_model_weights)
    round_num = tff.federated_broadcast(state.client_work)
    result, personal, sums = tff.federated_map(client_train, (broadcast.result, round_num, clients))
    agg = aggregator.next(state.aggregator, result.update)
    final = finalizer.next(state.finalizer, state.global_model_weights, agg.result)
    totals = tff.federated_sum(sums)
    if client_eval is not None:
      eval_sums = tff.federated_map(client_eval, (
          tff.federated_broadcast(final.result), personal, clients.data))
      totals = tff.federated_map(merge, (totals, tff.federated_sum(eval_sums)))
    metrics = tff.federated_map(tff.tensorflow.computation(_finalize_metrics), totals)
    new_state = tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        global_model_weights=final.result, distributor=broadcast.state,
        client_work=tff.federated_map(increment, state.client_work), aggregator=agg.state,
        finalizer=final.state))
    measurements = tff.federated_zip(collections.OrderedDict(
        train=metrics, aggregator=agg.measurements, finalizer=final.measurements))
    return collections.OrderedDict(state=new_state, personal=personal, metrics=measurements)

  return tff.templates.IterativeProcess(initialize, next_fn)
