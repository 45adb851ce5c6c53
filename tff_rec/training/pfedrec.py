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
* the loss is PyTorch's `BCELoss` on sigmoid outputs, with its backward
  pass (`personalized_process.bce_logit_grad`): that matters at the item
  learning rate the paper uses (about 3e4 on ML-1M);
* ranking metrics are computed on the device from the float32 probabilities,
  ties counted against the held-out item (the reference's `rank(method=
  'first')` with negatives listed first, metrics.py:35-40).

The round is `personalized_process.build_process` (TFF's distributor,
aggregator and finalizer; see there why the client work is ours). The
aggregator is created for the item table's type alone, so nothing else can
reach the server except scalar metric sums.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.training import personalized_process as pp


# The item table a device ranks with. A local step changes only the rows of
# the round's examples: the user's training positives (never ranked) and its
# sampled negatives, each pushed down. So the 'fine_tuned' view ranks the
# unrated items exactly as the received global table does, except that this
# round's sampled negatives are demoted. Under the published sampling those
# are never the held-out items (the leak, `fedrec_protocol`); without it, a
# held-out item is demoted whenever it was drawn. 'global' ranks with the
# aggregated table and the personal head, which no round's draw perturbs.
RANKINGS = ('fine_tuned', 'global')


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
    ranking: The item table a device ranks with. 'fine_tuned' (the
      reference, engine.py:172): its own copy after this round's local
      steps. 'global' (ours, not in the paper): the aggregated table after
      the server update, scored with the device's own head; see
      `RANKINGS` for why.
  """

  embedding_dim: int = 32
  learning_rate: float = 0.1
  lr_eta: float = 80.0
  batch_size: int = 256
  local_epochs: int = 1
  l2: float = 0.0
  top_k: int = 10
  ranking: str = 'fine_tuned'

  def __post_init__(self):
    if self.ranking not in RANKINGS:
      raise ValueError(f'ranking must be one of {RANKINGS}, got {self.ranking!r}')
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


def head_step(e, g, w, bias, *, lr, l2: float):
  """One SGD step on the score function (w, bias) of logits `e @ w + bias`.

  Args:
    e: The batch's item rows `[batch, d]`.
    g: d loss / d logits (`personalized_process.bce_logit_grad`).
    w, bias: The head.
    lr: Its learning rate.
    l2: SGD weight decay (0: none).

  Returns:
    (w, bias) after the step.
  """
  grad_w = tf.linalg.matvec(e, g, transpose_a=True)
  grad_b = tf.reduce_sum(g)
  if l2:
    grad_w += l2 * w
    grad_b += l2 * bias
  return w - lr * grad_w, bias - lr * grad_b


def fit_head(table, head_w, head_b, items, labels, *, config: PFedRecConfig, epochs: int):
  """`epochs` passes of head-only SGD steps (PFedRec's head step) on a fixed table
  (FedRecon's reconstruction, `fedrecon_ncf`).

  Returns:
    (head_w, head_b).
  """
  lr = tf.constant(config.learning_rate, tf.float32)
  b = config.batch_size
  n = tf.size(items)
  num_batches = (n + b - 1) // b

  def body(step, w, bias):
    start = (step % num_batches) * b
    end = tf.minimum(start + b, n)
    e = tf.gather(table, items[start:end])
    g = pp.bce_logit_grad(tf.linalg.matvec(e, w) + bias, labels[start:end])
    return (step + 1, *head_step(e, g, w, bias, lr=lr, l2=config.l2))

  _, head_w, head_b = tf.while_loop(lambda step, *_: step < num_batches * epochs, body,
                                    (tf.constant(0), head_w, head_b))
  return head_w, head_b


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
    g = pp.bce_logit_grad(tf.linalg.matvec(e, w) + bias, y)
    w, bias = head_step(e, g, w, bias, lr=lr, l2=l2)
    # Item-embedding step with the updated head.
    logits = tf.linalg.matvec(e, w) + bias
    loss_sum += pp.bce_loss(logits, y) * tf.cast(end - start, tf.float32)
    g = pp.bce_logit_grad(logits, y)
    rows = g[:, None] * w[None, :]
    if l2:
      table = table * (1.0 - item_lr * l2)
    table = tf.tensor_scatter_nd_sub(table, it[:, None], item_lr * rows)
    return step + 1, table, w, bias, loss_sum

  _, table, head_w, head_b, loss_sum = tf.while_loop(
      lambda step, *_: step < steps, body,
      (tf.constant(0), table, head_w, head_b, tf.constant(0.0)))
  return table, head_w, head_b, loss_sum, n * config.local_epochs


def build_client_update(config: PFedRecConfig, num_items: int, weights_type, client_type):
  """The client's TF computation (with `ranking='fine_tuned'`, its evaluation too).

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    weights_type: The broadcast `ModelWeights` type (the item table).
    client_type: `OrderedDict(personal=personal_type(config), data=data_type())`.

  Returns:
    A `tff.tensorflow.computation` mapping (global weights, round number,
    client input) to (ClientResult(initial - fine-tuned table, 1.0), new
    device state, sums over `personalized_process.METRIC_SUMS`): the
    client evaluates with its own fine-tuned table and head, as the
    reference does (engine.py:172); with `ranking='global'` the sums are
    `TRAIN_SUMS` only (see `build_global_ranking_eval`). A non-finite update
    is zeroed and counted.
  """

  @tff.tensorflow.computation(weights_type, tff.TensorType(np.int32), client_type)
  def client_update(weights, round_num, client):
    del round_num  # PFedRec's rates are constant
    table = weights.trainable[0]
    personal, data = client['personal'], client['data']
    local, head_w, head_b, loss_sum, num_examples = local_train(
        table, personal['head_w'], personal['head_b'], data['items'], data['labels'],
        config=config, num_items=num_items)
    delta, non_finite = pp.zero_if_not_finite(table - local)
    new_personal = collections.OrderedDict(head_w=head_w, head_b=head_b)
    sums = collections.OrderedDict(
        loss_sum=loss_sum, num_examples=tf.cast(num_examples, tf.float32),
        num_clients=tf.constant(1.0), non_finite_updates=non_finite)
    if config.ranking == 'fine_tuned':
      probs = tf.sigmoid(tf.linalg.matvec(local, head_w) + head_b)
      metrics = pp.device_metrics(probs, data, num_items, config.top_k)
      sums.update((k, metrics[k]) for k in pp.EVAL_SUMS)
    result = tff.learning.templates.ClientResult(update=(delta,), update_weight=tf.constant(1.0))
    return result, new_personal, sums

  return client_update


def build_global_ranking_eval(config: PFedRecConfig, num_items: int, weights_type):
  """`ranking='global'`: the device ranks with the aggregated table and its head.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    weights_type: The global `ModelWeights` type (the item table).

  Returns:
    A `tff.tensorflow.computation` (new global weights, new device state,
    data) -> sums over `personalized_process.EVAL_SUMS`, run on the device
    after the server update.
  """

  @tff.tensorflow.computation(weights_type, personal_type(config), pp.data_type())
  def client_eval(weights, personal, data):
    probs = tf.sigmoid(tf.linalg.matvec(weights.trainable[0], personal['head_w']) +
                       personal['head_b'])
    metrics = pp.device_metrics(probs, data, num_items, config.top_k)
    return collections.OrderedDict((k, metrics[k]) for k in pp.EVAL_SUMS)

  return client_eval


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
  table0, _ = initial_values(config, num_items, seed)
  w_type = pp.weights_type(table0.shape)
  client_type = tff.to_type(collections.OrderedDict(personal=personal_type(config),
                                                    data=pp.data_type()))
  client_eval = None
  if config.ranking == 'global':
    client_eval = build_global_ranking_eval(config, num_items, w_type)
  return pp.build_process(
      initial_table=table0, personal_type=personal_type(config),
      client_train=build_client_update(config, num_items, w_type, client_type),
      client_eval=client_eval, model_aggregator=model_aggregator,
      algorithm='PFedRec (engine.py:80)')
