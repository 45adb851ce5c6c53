"""Federated Reconstruction (Singhal et al., NeurIPS 2021) under the federated-NCF protocol.

The FedRecon baseline of the federated-recommendation tables, on the same
model and client recipe as PFedRec and FedMF (`pfedrec`, `fedmf`), so that
the three differ only in what the device keeps:

* the score is sigmoid(u . e_item + b); (u, b) is the user's local variable
  and the item table the global one, averaged uniformly;
* every round the device *reconstructs* (u, b) from the same initial value
  (`pfedrec.initial_values`), with `recon_epochs` passes of SGD steps on
  (u, b) alone over the round's examples against the received table
  (`pfedrec.fit_head`), then, with (u, b) frozen, takes `local_epochs`
  passes of SGD steps on the item rows (FedRecon's split of local and global
  updates, with the round's examples as both support and query, as
  FedRecon's `split_dataset=False`);
* it ranks after the server update, reconstructing (u, b) again against the
  aggregated table (FedRecon's evaluation).

Nothing the device learned carries to its next round: that is FedRecon's
point (stateless clients). The device state written each round is the
latest reconstruction, which a deployed device would use to recommend
between rounds; training never reads it.

This lives beside `tff_rec/training/fed_recon.py` (the FedRecon of the
explicit-rating experiments, built on TFF's reconstruction process over Keras
models) because this protocol's clients need PFedRec's hand-written step and
loss (PyTorch's BCELoss backward) and the on-device full ranking, which that
process does not provide.
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
class FedReconConfig(pfedrec.PFedRecConfig):
  """PFedRec's client hyperparameters; `recon_epochs` passes reconstruct (u, b),
  at `learning_rate`, before the item steps and before ranking."""

  ranking: str = 'global'
  recon_epochs: int = 5

  def __post_init__(self):
    if self.ranking != 'global':
      raise ValueError(f"FedRecon ranks with the aggregated table: ranking must be 'global', "
                       f'got {self.ranking!r}')
    if self.recon_epochs < 1:
      raise ValueError(f'FedRecon needs recon_epochs >= 1, got {self.recon_epochs}')
    super().__post_init__()


def item_steps(table, user_w, user_b, items, labels, *, config: FedReconConfig, num_items: int):
  """`local_epochs` passes of SGD steps on the item rows with (u, b) frozen.

  Returns:
    (table, loss_sum, num_examples): the locally trained table and the sum
    over batches of the batch loss (before its step) times the batch size.
  """
  item_lr = tf.constant(config.item_learning_rate(num_items), tf.float32)
  b = config.batch_size
  n = tf.size(items)
  num_batches = (n + b - 1) // b

  def body(step, table, loss_sum):
    start = (step % num_batches) * b
    end = tf.minimum(start + b, n)
    it = items[start:end]
    y = labels[start:end]
    logits = tf.linalg.matvec(tf.gather(table, it), user_w) + user_b
    loss_sum += pp.bce_loss(logits, y) * tf.cast(end - start, tf.float32)
    g = pp.bce_logit_grad(logits, y)
    if config.l2:
      table = table * (1.0 - item_lr * config.l2)
    table = tf.tensor_scatter_nd_sub(table, it[:, None], item_lr * g[:, None] * user_w[None, :])
    return step + 1, table, loss_sum

  _, table, loss_sum = tf.while_loop(
      lambda step, *_: step < num_batches * config.local_epochs, body,
      (tf.constant(0), table, tf.constant(0.0)))
  return table, loss_sum, n * config.local_epochs


def build_client_computations(config: FedReconConfig, num_items: int, user0: dict):
  """FedRecon's client training and on-device evaluation.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    user0: The initial (u, b) every reconstruction starts from
      (`initial_values(...)[1]`).

  Returns:
    (client_train, client_eval) for `personalized_process.build_process`.
  """
  w_type = pp.weights_type((num_items, config.embedding_dim))
  u_type = personal_type(config)
  client_type = tff.to_type(collections.OrderedDict(personal=u_type, data=pp.data_type()))
  w0 = np.asarray(user0['head_w'], np.float32)
  b0 = np.float32(user0['head_b'])

  def reconstruct(table, data):
    return pfedrec.fit_head(table, tf.constant(w0), tf.constant(b0), data['items'],
                            data['labels'], config=config, epochs=config.recon_epochs)

  @tff.tensorflow.computation(w_type, tff.TensorType(np.int32), client_type)
  def client_train(weights, round_num, client):
    del round_num  # constant rates
    table = weights.trainable[0]
    data = client['data']  # the stored reconstruction is never read: stateless clients
    w, bias = reconstruct(table, data)
    local, loss_sum, num_examples = item_steps(table, w, bias, data['items'], data['labels'],
                                               config=config, num_items=num_items)
    delta, non_finite = pp.zero_if_not_finite(table - local)
    sums = collections.OrderedDict(
        loss_sum=loss_sum, num_examples=tf.cast(num_examples, tf.float32),
        num_clients=tf.constant(1.0), non_finite_updates=non_finite)
    return (tff.learning.templates.ClientResult(update=(delta,), update_weight=tf.constant(1.0)),
            collections.OrderedDict(head_w=w, head_b=bias), sums)

  @tff.tensorflow.computation(w_type, u_type, pp.data_type())
  def client_eval(weights, personal, data):
    del personal  # reconstructed against the aggregated table instead
    table = weights.trainable[0]
    w, bias = reconstruct(table, data)
    probs = tf.sigmoid(tf.linalg.matvec(table, w) + bias)
    metrics = pp.device_metrics(probs, data, num_items, config.top_k)
    return collections.OrderedDict((k, metrics[k]) for k in pp.EVAL_SUMS)

  return client_train, client_eval


def build_fedrecon(*, config: FedReconConfig, num_items: int, seed: int = 0,
                   model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None
                   ) -> tff.templates.IterativeProcess:
  """FedRecon (this protocol) as a TFF iterative process.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    seed: Seeds the item table and the initial (u, b).
    model_aggregator: An unweighted `tff.aggregators` factory for the item
      table updates (default: uniform mean); e.g. a DP factory.

  Returns:
    The `tff.templates.IterativeProcess` of `personalized_process.build_process`.

  Raises:
    TypeError: a weighted aggregation factory.
  """
  table0, user0 = initial_values(config, num_items, seed)
  client_train, client_eval = build_client_computations(config, num_items, user0)
  return pp.build_process(initial_table=table0, personal_type=personal_type(config),
                          client_train=client_train, client_eval=client_eval,
                          model_aggregator=model_aggregator, algorithm='FedRecon')
