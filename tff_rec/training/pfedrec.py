"""PFedRec (Zhang et al., "Dual Personalization on Federated Recommendation", IJCAI 2023).

The algorithm of the reference code (github Zhangcx19/IJCAI-23-PFedRec,
commit abc2380), as a TFF iterative process:

* model (`mlp.py`): score(item) = sigmoid(head_w . e_item + head_b); no user
  embedding. The head is the user's *score function*: it never leaves the
  device (engine.py:143 keeps it out of the upload) and persists across
  rounds (engine.py:106-109);
* each round the client starts from the server's item table (engine.py:110)
  and takes, per batch, an SGD step on the head (lr) and then one on the item
  table (lr x num_items x lr_eta) with the updated head (engine.py:52-63,
  :114-119); the fine-tuned table is the client's *personal view* of the
  items, used for its own evaluation (engine.py:172), and the server averages
  the tables uniformly over the participants (engine.py:67-80);
* the loss is PyTorch's `BCELoss` on sigmoid outputs, whose backward pass
  returns a zero gradient once float32 sigmoid saturates at 1.0. That matters
  at the item learning rate the paper uses (about 3e4 on ML-1M), so the
  gradients are written out (`_bce_logit_grad`) to match it;
* ranking metrics are computed on the device from the float32 probabilities,
  ties counted against the held-out item (the reference's `rank(method=
  'first')` with negatives listed first, metrics.py:35-40).

Why the client work is written here rather than as a
`tff.learning.templates.ClientWorkProcess`: that template returns only a
`ClientResult` and SERVER-placed measurements, while a personalized client
must also return its new device state. The rest is TFF's:
`build_broadcast_process` (distributor), any unweighted `tff.aggregators`
factory (default `UnweightedMeanFactory`, the reference's plain mean; DP
factories plug in the same way), and `build_apply_optimizer_finalizer` with
SGD at rate 1 (the reference's server step). The round's `next` returns
`(state, device_states@CLIENTS, metrics@SERVER)`; the aggregator is created
for the item table's type alone, so nothing else can reach the server except
scalar metric sums.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

METRIC_SUMS = ('loss_sum', 'num_examples', 'num_clients', 'non_finite_updates',
               'val_hit', 'val_ndcg', 'test_hit', 'test_ndcg',
               'val_full_hit', 'val_full_ndcg', 'test_full_hit', 'test_full_ndcg')
# torch.nn.BCELoss clamps its denominator at this epsilon (aten/src/ATen/native/Loss.cpp).
_TORCH_BCE_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class PFedRecConfig:
  """PFedRec's hyperparameters (defaults: the reference `train.py`).

  Attributes:
    embedding_dim: Item embedding size (`--latent_dim`).
    learning_rate: SGD rate of the head (`--lr`).
    lr_eta: The item table's rate is `learning_rate * num_items * lr_eta`.
    batch_size: Local batch size.
    local_epochs: Passes over the round's examples (the order repeats).
    l2: SGD weight decay of head and items (`--l2_regularization`).
    top_k: The cut-off of HR@k and NDCG@k.
  """

  embedding_dim: int = 32
  learning_rate: float = 0.1
  lr_eta: float = 80.0
  batch_size: int = 256
  local_epochs: int = 1
  l2: float = 0.0
  top_k: int = 10

  def __post_init__(self):
    for name in ('embedding_dim', 'batch_size', 'local_epochs', 'top_k'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    for name in ('learning_rate', 'lr_eta'):
      v = getattr(self, name)
      if not (v > 0 and math.isfinite(v)):
        raise ValueError(f'{name} must be positive and finite, got {v}')
    if not (self.l2 >= 0 and math.isfinite(self.l2)):
      raise ValueError(f'l2 must be >= 0, got {self.l2}')

  def item_learning_rate(self, num_items: int) -> float:
    return self.learning_rate * num_items * self.lr_eta


def initial_values(config: PFedRecConfig, num_items: int, seed: int) -> tuple[np.ndarray, dict]:
  """(item table, head) as PyTorch initializes them: `Embedding` N(0, 1),
  `Linear` weight and bias U(-1/sqrt(d), 1/sqrt(d)). Every client starts
  from the same head (engine.py:100-103)."""
  rng = np.random.default_rng([seed, 0x9FED])
  d = config.embedding_dim
  table = rng.standard_normal((num_items, d)).astype(np.float32)
  bound = 1.0 / math.sqrt(d)
  head = collections.OrderedDict(
      head_w=rng.uniform(-bound, bound, d).astype(np.float32),
      head_b=np.float32(rng.uniform(-bound, bound)))
  return table, head


def personal_type(config: PFedRecConfig) -> tff.StructType:
  return tff.to_type(collections.OrderedDict(
      head_w=tff.TensorType(np.float32, [config.embedding_dim]),
      head_b=tff.TensorType(np.float32)))


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


def _bce_logit_grad(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """d mean(BCELoss(sigmoid(x), y)) / dx, as PyTorch's backward computes it."""
  p = tf.sigmoid(logits)
  p1 = p * (1.0 - p)
  n = tf.cast(tf.size(labels), tf.float32)
  return (p - labels) / tf.maximum(p1, _TORCH_BCE_EPS) * ((1.0 - p) * p) / n


def _bce_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """mean BCELoss(sigmoid(x), y) with PyTorch's log clamp at -100."""
  p = tf.sigmoid(logits)
  log_p = tf.maximum(tf.math.log(p), -100.0)
  log_q = tf.maximum(tf.math.log(1.0 - p), -100.0)
  return -tf.reduce_mean(labels * log_p + (1.0 - labels) * log_q)


def local_train(table, head_w, head_b, items, labels, *, config: PFedRecConfig, num_items: int):
  """The reference client's local epochs (engine.py:124-130) on tensors.

  Returns:
    (table, head_w, head_b, loss_sum, num_examples): the fine-tuned item table
    and head, and the sum over batches of the batch loss after the head step
    times the batch size (the reference's reported loss).
  """
  lr = tf.constant(config.learning_rate, tf.float32)
  item_lr = tf.constant(config.item_learning_rate(num_items), tf.float32)
  l2 = config.l2
  b = config.batch_size
  n = tf.size(items)
  num_batches = (n + b - 1) // b
  steps = num_batches * config.local_epochs

  def body(step, table, w, bias, loss_sum):
    start = (step % num_batches) * b
    end = tf.minimum(start + b, n)
    it = items[start:end]
    y = labels[start:end]
    e = tf.gather(table, it)
    # Score-function (head) step.
    g = _bce_logit_grad(tf.linalg.matvec(e, w) + bias, y)
    grad_w = tf.linalg.matvec(e, g, transpose_a=True)
    grad_b = tf.reduce_sum(g)
    if l2:
      grad_w += l2 * w
      grad_b += l2 * bias
    w = w - lr * grad_w
    bias = bias - lr * grad_b
    # Item-embedding step with the updated head.
    logits = tf.linalg.matvec(e, w) + bias
    loss_sum += _bce_loss(logits, y) * tf.cast(end - start, tf.float32)
    g = _bce_logit_grad(logits, y)
    rows = g[:, None] * w[None, :]
    if l2:
      table = table * (1.0 - item_lr * l2)
    table = tf.tensor_scatter_nd_sub(table, it[:, None], item_lr * rows)
    return step + 1, table, w, bias, loss_sum

  _, table, head_w, head_b, loss_sum = tf.while_loop(
      lambda step, *_: step < steps, body,
      (tf.constant(0), table, head_w, head_b, tf.constant(0.0)))
  return table, head_w, head_b, loss_sum, n * config.local_epochs


def _rank_gain(rank, k: int):
  hit = tf.cast(rank < k, tf.float32)
  return hit, hit / (tf.math.log(tf.cast(rank, tf.float32) + 2.0) / math.log(2.0))


def device_metrics(probs: tf.Tensor, data, num_items: int, k: int) -> dict:
  """HR@k and NDCG@k of the val and test items, sampled and full ranking.

  Sampled: the held-out item against its 99 negatives. Full: against every
  item outside the user's training set, other than itself. A rank counts
  the candidates with probability >= the item's (ties against it).
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


def build_client_update(config: PFedRecConfig, num_items: int, weights_type, client_type):
  """The client's TF computation.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    weights_type: The broadcast `ModelWeights` type (the item table).
    client_type: `OrderedDict(personal=personal_type(config), data=data_type())`.

  Returns:
    A `tff.tensorflow.computation` mapping (global weights, client input) to
    (ClientResult(initial - fine-tuned table, 1.0), new device state, metric
    sums over `METRIC_SUMS`). A non-finite update is zeroed and counted.
  """

  @tff.tensorflow.computation(weights_type, client_type)
  def client_update(weights, client):
    table = weights.trainable[0]
    personal, data = client['personal'], client['data']
    local, head_w, head_b, loss_sum, num_examples = local_train(
        table, personal['head_w'], personal['head_b'], data['items'], data['labels'],
        config=config, num_items=num_items)
    probs = tf.sigmoid(tf.linalg.matvec(local, head_w) + head_b)
    metrics = device_metrics(probs, data, num_items, config.top_k)
    delta = table - local
    finite = tf.reduce_all(tf.math.is_finite(delta))
    delta = tf.where(finite, delta, tf.zeros_like(delta))
    new_personal = collections.OrderedDict(head_w=head_w, head_b=head_b)
    sums = collections.OrderedDict(
        loss_sum=loss_sum, num_examples=tf.cast(num_examples, tf.float32),
        num_clients=tf.constant(1.0), non_finite_updates=1.0 - tf.cast(finite, tf.float32),
        **{k: metrics[k] for k in METRIC_SUMS[4:]})
    result = tff.learning.templates.ClientResult(update=(delta,), update_weight=tf.constant(1.0))
    return result, new_personal, sums

  return client_update


def _finalize_metrics(sums):
  n = tf.maximum(sums['num_clients'], 1.0)
  out = collections.OrderedDict(
      loss=sums['loss_sum'] / tf.maximum(sums['num_examples'], 1.0),
      num_clients=sums['num_clients'], num_examples=sums['num_examples'],
      non_finite_updates=sums['non_finite_updates'])
  for k in METRIC_SUMS[4:]:
    out[k.replace('_hit', '_hr')] = sums[k] / n
  return out


def build_pfedrec(*, config: PFedRecConfig, num_items: int, seed: int = 0,
                  model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None
                  ) -> tff.templates.IterativeProcess:
  """PFedRec as a TFF iterative process.

  Args:
    config: Hyperparameters.
    num_items: Catalog size (rows of the item table).
    seed: Seeds the initial item table (the initial head is
      `initial_values(...)[1]`, which the caller gives every new device).
    model_aggregator: An unweighted `tff.aggregators` factory for the item
      table updates (default `tff.aggregators.UnweightedMeanFactory()`, the
      reference's uniform mean); e.g. a DP factory.

  Returns:
    `tff.templates.IterativeProcess` with `initialize() -> state` and
    `next(state, clients) -> OrderedDict(state, personal, metrics)`, where
    `clients` is CLIENTS-placed `OrderedDict(personal=<device state>,
    data=<data_type()>)`, `personal` the new device states (CLIENTS) and
    `metrics` SERVER means (`loss`, `val_hr`, `test_ndcg`, `val_full_hr`, ...).

  Raises:
    TypeError: a weighted aggregation factory.
  """
  if model_aggregator is None:
    model_aggregator = tff.aggregators.UnweightedMeanFactory()
  if not isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError('PFedRec averages uniformly (engine.py:80): model_aggregator must be a '
                    f'tff.aggregators.UnweightedAggregationFactory, got {type(model_aggregator)}')
  table0, _ = initial_values(config, num_items, seed)
  table_type = tff.TensorType(np.float32, table0.shape)
  weights_type = tff.to_type(tff.learning.models.ModelWeights(trainable=(table_type,),
                                                              non_trainable=()))
  p_type = personal_type(config)
  client_type = tff.to_type(collections.OrderedDict(personal=p_type, data=data_type()))
  client_update = build_client_update(config, num_items, weights_type, client_type)
  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  aggregator = model_aggregator.create(weights_type.trainable)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      tff.learning.optimizers.build_sgdm(learning_rate=1.0), weights_type)

  @tff.tensorflow.computation
  def initial_weights():
    return tff.learning.models.ModelWeights(trainable=(tf.constant(table0),), non_trainable=())

  @tff.federated_computation
  def initialize():
    return tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        global_model_weights=tff.federated_eval(initial_weights, tff.SERVER),
        distributor=distributor.initialize(), client_work=tff.federated_value((), tff.SERVER),
        aggregator=aggregator.initialize(), finalizer=finalizer.initialize()))

  state_type = initialize.type_signature.result

  @tff.federated_computation(state_type, tff.FederatedType(client_type, tff.CLIENTS))
  def next_fn(state, clients):
    broadcast = distributor.next(state.distributor, state.global_model_weights)
    result, personal, sums = tff.federated_map(client_update, (broadcast.result, clients))
    agg = aggregator.next(state.aggregator, result.update)
    final = finalizer.next(state.finalizer, state.global_model_weights, agg.result)
    metrics = tff.federated_map(tff.tensorflow.computation(_finalize_metrics),
                                tff.federated_sum(sums))
    new_state = tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
        global_model_weights=final.result, distributor=broadcast.state,
        client_work=state.client_work, aggregator=agg.state, finalizer=final.state))
    measurements = tff.federated_zip(collections.OrderedDict(
        train=metrics, aggregator=agg.measurements, finalizer=final.measurements))
    return collections.OrderedDict(state=new_state, personal=personal, metrics=measurements)

  return tff.templates.IterativeProcess(initialize, next_fn)
