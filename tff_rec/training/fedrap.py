"""FedRAP (Li, Long, Zhou, "Federated Recommendation with Additive Personalization", ICLR 2024).

The algorithm of the reference code (github mtics/FedRAP, commit d6ee2ac), as
a TFF iterative process (`personalized_process.build_process`):

* model (model/model.py): score(item) = sigmoid(head . (P_item + C_item) + b)
  with a global item table C (the *commonality*, aggregated) and an additive
  per-user table P (the *personality*); head, bias and P never leave the
  device (engine.py:170-173 drop them from the upload) and persist across
  rounds (engine.py:112-121);
* loss (model/loss.py): BCE - lambda * MSE(P_items, C_items) + mu *
  L1(C_items) over the batch's rows (`regular='l1'`; 'l2' is the MSE to
  zero, 'none' drops the term);
* one SGD optimizer (engine.py:126-131): the head at `lr_network` (0.5), both
  tables at `lr_args` (200), weight decay 1e-4 on every parameter (dense:
  every row of both tables decays every step, as torch applies it to dense
  embedding gradients), an `ExponentialLR(0.95)` stepped after every batch,
  and both rates times `decay_rate` (0.97) after every round (engine.py:180-181);
* up to 10 local epochs of batch 2048, stopping when the relative change of
  the running mean loss (accumulated over all epochs so far, engine.py:144-155)
  falls below `tol`;
* the server averages C uniformly (engine.py:60-75); each user is evaluated
  with its own head and P and the *aggregated* C (engine.py:211-214), so the
  devices evaluate after the server update.

Reference details we keep apart, and why:

* the curriculum of the paper (lambda and mu grow as tanh(round / 10)) is
  computed in engine.py:184-186 but never used: `Loss` reads the fixed
  `config['lambda']` / `config['mu']`. `curriculum='none'` (default) is the
  code; `curriculum='tanh'` is the paper;
* the code picks the reported round by the best *test* HR (train.py:141-143)
  and evaluates val and test against the same 99 negatives (utils/data.py:93,
  :158). We always select on validation, under the protocol of
  `fedrec_protocol` (PFedRec's, with separate val and test negatives), so all
  methods share one protocol;
* each epoch reuses the round's shuffled order (the reference reshuffles per
  epoch; with batch 2048 most ML-100K / ML-1M users have one batch).
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

REGULARIZERS = ('l1', 'l2', 'none')
CURRICULA = ('none', 'tanh')


@dataclasses.dataclass(frozen=True)
class FedRAPConfig:
  """FedRAP's hyperparameters (defaults: the reference train.py).

  Attributes:
    embedding_dim: Table width (`--latent_dim`).
    head_learning_rate: SGD rate of the head (`--lr_network`).
    item_learning_rate: SGD rate of both tables (`--lr_args`).
    round_decay: Both rates times this after every round (`--decay_rate`).
    batch_decay: Both rates times this after every local batch
      (`ExponentialLR(gamma=0.95)`, restarted each round).
    local_epochs: At most this many local epochs (`--local_epoch`).
    tol: Early stop on the relative change of the running loss (`--tol`).
    batch_size: Local batch size.
    weight_decay: SGD weight decay (`--l2_regularization`).
    lam: Weight of the -MSE(P, C) term (`--lambda`).
    mu: Weight of the regularizer on C (`--mu`).
    regular: 'l1' (mean |C|), 'l2' (mean C^2) or 'none' (`--regular`).
    curriculum: 'none' (the code: fixed lam, mu) or 'tanh' (the paper:
      lam * tanh(round / 10), mu likewise).
    top_k: The cut-off of HR@k / NDCG@k.
  """

  embedding_dim: int = 32
  head_learning_rate: float = 0.5
  item_learning_rate: float = 200.0
  round_decay: float = 0.97
  batch_decay: float = 0.95
  local_epochs: int = 10
  tol: float = 1e-4
  batch_size: int = 2048
  weight_decay: float = 1e-4
  lam: float = 0.1
  mu: float = 0.1
  regular: str = 'l1'
  curriculum: str = 'none'
  top_k: int = 10

  def __post_init__(self):
    for name in ('embedding_dim', 'local_epochs', 'batch_size', 'top_k'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    for name in ('head_learning_rate', 'item_learning_rate', 'round_decay', 'batch_decay'):
      v = getattr(self, name)
      if not (v > 0 and math.isfinite(v)):
        raise ValueError(f'{name} must be positive and finite, got {v}')
    for name in ('tol', 'weight_decay', 'lam', 'mu'):
      v = getattr(self, name)
      if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f'{name} must be >= 0 and finite, got {v}')
    if self.regular not in REGULARIZERS:
      raise ValueError(f'unknown regular {self.regular!r}; valid: {", ".join(REGULARIZERS)}')
    if self.curriculum not in CURRICULA:
      raise ValueError(f'unknown curriculum {self.curriculum!r}; valid: {", ".join(CURRICULA)}')


def initial_values(config: FedRAPConfig, num_items: int, seed: int) -> tuple[np.ndarray, dict]:
  """(C, device state) as PyTorch initializes them: both tables N(0, 1),
  the head U(-1/sqrt(d), 1/sqrt(d)); every device starts from the same P and
  head (engine.py:104-108 copy one model)."""
  rng = np.random.default_rng([seed, 0xFED4])
  d = config.embedding_dim
  commonality = rng.standard_normal((num_items, d)).astype(np.float32)
  personality = rng.standard_normal((num_items, d)).astype(np.float32)
  bound = 1.0 / math.sqrt(d)
  state = collections.OrderedDict(
      head_w=rng.uniform(-bound, bound, d).astype(np.float32),
      head_b=np.float32(rng.uniform(-bound, bound)), personality=personality)
  return commonality, state


def personal_type(config: FedRAPConfig, num_items: int) -> tff.StructType:
  return tff.to_type(collections.OrderedDict(
      head_w=tff.TensorType(np.float32, [config.embedding_dim]),
      head_b=tff.TensorType(np.float32),
      personality=tff.TensorType(np.float32, [num_items, config.embedding_dim])))


def _weights(config: FedRAPConfig, round_num):
  r = tf.cast(round_num, tf.float32)
  if config.curriculum == 'tanh':
    ramp = tf.math.tanh(r / 10.0)
    lam, mu = config.lam * ramp, config.mu * ramp
  else:
    lam, mu = tf.constant(config.lam), tf.constant(config.mu)
  if config.regular == 'none':
    mu = tf.constant(0.0)
  return lam, mu


def local_train(common, personality, head_w, head_b, items, labels, round_num, *,
                config: FedRAPConfig):
  """The reference client's local epochs (engine.py:133-155) on tensors.

  Returns:
    (C, P, head_w, head_b, loss_sum, num_examples), where loss_sum /
    num_examples is the running mean loss the reference reports.
  """
  decay = tf.pow(tf.constant(config.round_decay, tf.float32), tf.cast(round_num, tf.float32))
  lr_h = config.head_learning_rate * decay
  lr_i = config.item_learning_rate * decay
  lam, mu = _weights(config, round_num)
  wd = config.weight_decay
  b = config.batch_size
  n = tf.size(items)
  num_batches = (n + b - 1) // b

  def batch_step(k, common, pers, w, bias, loss_sum, count):
    step = k % num_batches
    start = step * b
    end = tf.minimum(start + b, n)
    it = items[start:end]
    y = labels[start:end]
    e_p = tf.gather(pers, it)
    e_c = tf.gather(common, it)
    s = e_p + e_c
    x = tf.linalg.matvec(s, w) + bias
    g = pp.bce_logit_grad(x, y)
    m = tf.cast(tf.size(e_p), tf.float32)
    diff = e_p - e_c
    if config.regular == 'l1':
      reg, d_reg = tf.reduce_mean(tf.abs(e_c)), tf.sign(e_c) / m
    elif config.regular == 'l2':
      reg, d_reg = tf.reduce_mean(tf.square(e_c)), 2.0 * e_c / m
    else:
      reg, d_reg = tf.constant(0.0), tf.zeros_like(e_c)
    loss = pp.bce_loss(x, y) - lam * tf.reduce_mean(tf.square(diff)) + mu * reg
    d_s = g[:, None] * w[None, :]
    d_p = d_s - lam * 2.0 * diff / m
    d_c = d_s + lam * 2.0 * diff / m + mu * d_reg
    factor = tf.pow(tf.constant(config.batch_decay, tf.float32), tf.cast(k, tf.float32))
    h, i = lr_h * factor, lr_i * factor
    grad_w = tf.linalg.matvec(s, g, transpose_a=True) + wd * w
    grad_b = tf.reduce_sum(g) + wd * bias
    new_pers = tf.tensor_scatter_nd_sub(pers * (1.0 - i * wd), it[:, None], i * d_p)
    new_common = tf.tensor_scatter_nd_sub(common * (1.0 - i * wd), it[:, None], i * d_c)
    size = tf.cast(end - start, tf.float32)
    return (new_common, new_pers, w - h * grad_w, bias - h * grad_b, loss_sum + loss * size,
            count + size)

  def epoch_body(epoch, k, common, pers, w, bias, loss_sum, count, prev, done):
    def inner(j, k, common, pers, w, bias, loss_sum, count):
      common, pers, w, bias, loss_sum, count = batch_step(k, common, pers, w, bias, loss_sum,
                                                          count)
      return j + 1, k + 1, common, pers, w, bias, loss_sum, count

    _, k, common, pers, w, bias, loss_sum, count = tf.while_loop(
        lambda j, *_: j < num_batches, inner,
        (tf.constant(0), k, common, pers, w, bias, loss_sum, count))
    running = loss_sum / count
    converged = tf.logical_and(epoch > 0, tf.abs(running - prev) / tf.abs(prev) < config.tol)
    return epoch + 1, k, common, pers, w, bias, loss_sum, count, running, converged

  init = (tf.constant(0), tf.constant(0), common, personality, head_w, head_b,
          tf.constant(0.0), tf.constant(0.0), tf.constant(1.0), tf.constant(False))
  out = tf.while_loop(
      lambda epoch, *rest: tf.logical_and(epoch < config.local_epochs, tf.logical_not(rest[-1])),
      epoch_body, init)
  _, _, common, pers, w, bias, loss_sum, count, _, _ = out
  return common, pers, w, bias, loss_sum, count


def build_client_computations(config: FedRAPConfig, num_items: int):
  """FedRAP's client training and on-device evaluation.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.

  Returns:
    (client_train, client_eval) for `personalized_process.build_process`:
    training returns ClientResult(C_global - C_local, 1.0), the new device
    state (head, bias, P) and the training sums; evaluation scores with the
    device's head and P and the aggregated C.
  """
  w_type = pp.weights_type((num_items, config.embedding_dim))
  p_type = personal_type(config, num_items)
  client_type = tff.to_type(collections.OrderedDict(personal=p_type, data=pp.data_type()))

  @tff.tensorflow.computation(w_type, tff.TensorType(np.int32), client_type)
  def client_train(weights, round_num, client):
    common = weights.trainable[0]
    personal, data = client['personal'], client['data']
    local, pers, w, bias, loss_sum, count = local_train(
        common, personal['personality'], personal['head_w'], personal['head_b'], data['items'],
        data['labels'], round_num, config=config)
    delta, non_finite = pp.zero_if_not_finite(common - local)
    new_personal = collections.OrderedDict(head_w=w, head_b=bias, personality=pers)
    sums = collections.OrderedDict(loss_sum=loss_sum, num_examples=count,
                                   num_clients=tf.constant(1.0), non_finite_updates=non_finite)
    return (tff.learning.templates.ClientResult(update=(delta,), update_weight=tf.constant(1.0)),
            new_personal, sums)

  @tff.tensorflow.computation(w_type, p_type, pp.data_type())
  def client_eval(weights, personal, data):
    table = personal['personality'] + weights.trainable[0]
    probs = tf.sigmoid(tf.linalg.matvec(table, personal['head_w']) + personal['head_b'])
    metrics = pp.device_metrics(probs, data, num_items, config.top_k)
    return collections.OrderedDict((k, metrics[k]) for k in pp.EVAL_SUMS)

  return client_train, client_eval


def build_fedrap(*, config: FedRAPConfig, num_items: int, seed: int = 0,
                 model_aggregator: Optional[tff.aggregators.UnweightedAggregationFactory] = None
                 ) -> tff.templates.IterativeProcess:
  """FedRAP as a TFF iterative process.

  Args:
    config: Hyperparameters.
    num_items: Catalog size.
    seed: Seeds C (the initial device state is `initial_values(...)[1]`).
    model_aggregator: An unweighted `tff.aggregators` factory for the C
      updates (default: uniform mean, engine.py:60-75).

  Returns:
    The `tff.templates.IterativeProcess` of `personalized_process.build_process`.
  """
  common0, _ = initial_values(config, num_items, seed)
  client_train, client_eval = build_client_computations(config, num_items)
  return pp.build_process(initial_table=common0, personal_type=personal_type(config, num_items),
                          client_train=client_train, client_eval=client_eval,
                          model_aggregator=model_aggregator, algorithm='FedRAP (engine.py:60-75)')
