"""FedMF: federated matrix factorization with on-device user vectors, under the federated-NCF protocol.

The FedMF baseline of the federated-recommendation tables (PFedRec, IJCAI
2023, Table 2; Chai et al., "Secure Federated Matrix Factorization", IEEE
Intelligent Systems 2020, without its homomorphic encryption): the score is
sigmoid(u . e_item + b). The user vector u and bias b are device state, never
sent; the item table is global and averaged uniformly (FedAvg over the item
table). No published code fixes FedMF's client for this protocol, so it runs
on PFedRec's client recipe, which makes the two directly comparable:

* the same model form (PFedRec's score function is exactly (u, b)), the same
  initialization (`pfedrec.initial_values`), batch size, BCE loss with
  PyTorch's backward (`personalized_process.bce_logit_grad`) and item learning
  rate `learning_rate * num_items * lr_eta`;
* FedAvg's client step: per batch one *joint* SGD step on (u, b) and the
  batch's item rows, all from the same gradient (PFedRec alternates: head
  first, then items with the new head);
* evaluation with the *aggregated* item table after the server update (a
  second on-device computation in the same TFF round, as FedRAP's), where
  PFedRec evaluates with the client's own fine-tuned copy.

So FedMF against PFedRec measures PFedRec's item-side personalization; the
user side is personal in both.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.training import personalized_process as pp
from tff_rec.training import pfedrec

initial_values = pfedrec.initial_values
personal_type = pfedrec.personal_type


@dataclasses.dataclass(frozen=True)
class FedMFConfig(pfedrec.PFedRecConfig):
  """PFedRec's client hyperparameters (and defaults); devices always rank
  with the aggregated table (`ranking='global'`)."""

  ranking: str = 'global'

  def __post_init__(self):
    super().__post_init__()
    if self.ranking != 'global':
      raise ValueError(f"FedMF ranks with the aggregated table: ranking must be 'global', "
                       f'got {self.ranking!r}')


def local_train(table, user_w, user_b, items, labels, *, config: FedMFConfig, num_items: int):
  """FedAvg's local SGD on (u, b) and the item rows, jointly.

  Returns:
    (table, user_w, user_b, loss_sum, num_examples): the locally trained item
    table and user vector, and the sum over batches of the batch loss (before
    its step) times the batch size.
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
    logits = tf.linalg.matvec(e, w) + bias
    loss_sum += pp.bce_loss(logits, y) * tf.cast(end - start, tf.float32)
    g = pp.bce_logit_grad(logits, y)
    rows = g[:, None] * w[None, :]  # from the head before its step: a joint step
    new_w, new_bias = pfedrec.head_step(e, g, w, bias, lr=lr, l2=l2)
    if l2:
      table = table * (1.0 - item_lr * l2)
    table = tf.tensor_scatter_nd_sub(table, it[:, None], item_lr * rows)
    return step + 1, table, new_w, new_bias, loss_sum

  _, table, user_w, user_b, loss_sum = tf.while_loop(
      lambda step, *_: step < steps, body,
      (tf.constant(0), table, user_w, user_b, tf.constant(0.0)))
  return table, user_w, user_b, loss_sum, n * config.local_epochs


def build_client_computations(config: FedMFConfig, num_items: int):
  """FedMF's client training and on-device evaluation.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.

  Returns:
    (client_train, client_eval) for `personalized_process.build_process`:
    training returns ClientResult(global - local table, 1.0), the new user
    vector and bias, and the training sums; evaluation scores every item with
    the aggregated table and the device's user vector.
  """
  w_type = pp.weights_type((num_items, config.embedding_dim))
  u_type = personal_type(config)
  client_type = tff.to_type(collections.OrderedDict(personal=u_type, data=pp.data_type()))

  @tff.tensorflow.computation(w_type, tff.TensorType(np.int32), client_type)
  def client_train(weights, round_num, client):
    del round_num  # constant rates
    table = weights.trainable[0]
    personal, data = client['personal'], client['data']
    local, w, bias, loss_sum, num_examples = local_train(
        table, personal['head_w'], personal['head_b'], data['items'], data['labels'],
        config=config, num_items=num_items)
    delta, non_finite = pp.zero_if_not_finite(table - local)
    sums = collections.OrderedDict(
        loss_sum=loss_sum, num_examples=tf.cast(num_examples, tf.float32),
        num_clients=tf.constant(1.0), non_finite_updates=non_finite)
    return (tff.learning.templates.ClientResult(update=(delta,), update_weight=tf.constant(1.0)),
            collections.OrderedDict(head_w=w, head_b=bias), sums)

  return client_train, pfedrec.build_global_ranking_eval(config, num_items, w_type)


def build_fedmf(*, config: FedMFConfig, num_items: int, seed: int = 0,
                model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None
                ) -> tff.templates.IterativeProcess:
  """FedMF as a TFF iterative process.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    seed: Seeds the item table (the initial device state is
      `initial_values(...)[1]`).
    model_aggregator: An unweighted `tff.aggregators` factory for the item
      table updates (default: uniform mean); e.g. a DP factory.

  Returns:
    The `tff.templates.IterativeProcess` of `personalized_process.build_process`.

  Raises:
    TypeError: a weighted aggregation factory.
  """
  table0, _ = initial_values(config, num_items, seed)
  client_train, client_eval = build_client_computations(config, num_items)
  return pp.build_process(initial_table=table0, personal_type=personal_type(config),
                          client_train=client_train, client_eval=client_eval,
                          model_aggregator=model_aggregator, algorithm='FedMF')
