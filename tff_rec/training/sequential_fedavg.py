"""Federated averaging for sequential recommenders (SASRec): one client per user.

There is no user embedding: a user is their sequence, which never leaves the
device. A round broadcasts every model weight, each sampled client takes
`local_steps` SGD steps on its own window (the last `maxlen` training items
but one, the next items as targets, fresh negatives each step, as in
`tff_rec.training.sequential`), and the server averages the weight deltas,
weighted by each client's number of target positions (or with any
`tff.aggregators` factory, e.g. a DP one, which is applied unweighted), and
applies them with its optimizer.

The process is composed from TFF's building blocks
(`tff.learning.templates.compose_learning_process`): `build_broadcast_process`,
a `ClientWorkProcess` whose client update is a plain TF loop over the
client's steps with TFF's functional SGD (`tff.learning.optimizers`), the
aggregation factory, and `build_apply_optimizer_finalizer`. The client work
is ours, not `tff.learning.algorithms.build_weighted_fed_avg`, because that
builder needs a `tff.learning.models.VariableModel` with a Keras loss on
(x, y) batches, while the SASRec objective scores each position against its
own sampled negatives.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tqdm

from tff_rec.data import sequences
from tff_rec.models import sasrec
from tff_rec.training import sequential


@dataclasses.dataclass(frozen=True)
class FedSequentialConfig:
  """A federated sequential run.

  Attributes:
    central: The model, objective and evaluation settings (its optimizer,
      batch and epoch fields are unused).
    rounds: Federated rounds.
    clients_per_round: Users sampled uniformly without replacement per round.
    local_steps: SGD steps per client per round, each with fresh negatives.
    client_learning_rate: Client SGD rate.
    server_optimizer: 'adam' or 'sgd'.
    server_learning_rate: Server rate.
    eval_every: Evaluate every this many rounds (and after the last).
  """

  central: sequential.SequentialConfig = sequential.SequentialConfig()
  rounds: int = 100
  clients_per_round: int = 256
  local_steps: int = 1
  client_learning_rate: float = 1.0
  server_optimizer: str = 'adam'
  server_learning_rate: float = 0.001
  eval_every: int = 10

  def __post_init__(self):
    for what in ('rounds', 'clients_per_round', 'local_steps', 'eval_every'):
      if getattr(self, what) < 1:
        raise ValueError(f'{what} must be >= 1, got {getattr(self, what)}')
    if self.server_optimizer not in ('adam', 'sgd'):
      raise ValueError(f'server_optimizer must be adam or sgd, got {self.server_optimizer!r}')
    if not (self.client_learning_rate > 0 and self.server_learning_rate > 0):
      raise ValueError('learning rates must be > 0')


def _weights_of(model: tf.keras.Model) -> tff.learning.models.ModelWeights:
  return tff.learning.models.ModelWeights(
      trainable=tuple(v.numpy() for v in model.trainable_variables),
      non_trainable=tuple(v.numpy() for v in model.non_trainable_variables))


def _spec_of(weights: tff.learning.models.ModelWeights):
  return tff.learning.models.ModelWeights(
      trainable=tuple(tff.TensorType(np.float32, w.shape) for w in weights.trainable),
      non_trainable=tuple(tff.TensorType(np.float32, w.shape) for w in weights.non_trainable))


def build_process(*, model_fn: Callable[[], sasrec.SASRec], maxlen: int, loss: str,
                  num_negatives: int, client_learning_rate: float, server_optimizer: str,
                  server_learning_rate: float,
                  model_aggregator: Optional[tff.aggregators.AggregationFactory] = None
                  ) -> tff.learning.templates.LearningProcess:
  """FedAvg over every weight of a sequential model, from TFF's building blocks.

  Args:
    model_fn: Builds the model (with its variables), the same on every call.
    maxlen: The input window.
    loss: The objective (`sasrec.LOSSES`).
    num_negatives: Negatives per position ('sampled_softmax').
    client_learning_rate: Client SGD rate.
    server_optimizer: 'adam' or 'sgd'.
    server_learning_rate: Server rate.
    model_aggregator: A weighted or unweighted `tff.aggregators` factory
      (default: the mean weighted by target positions).

  Returns:
    A `tff.learning.templates.LearningProcess` whose `next(state, datasets)`
    takes one `tf.data.Dataset` of `(seq, pos, neg)` steps per client.
  """
  initial = _weights_of(model_fn())
  w_type = tff.to_type(_spec_of(initial))
  neg_shape = [1, maxlen] + ([num_negatives] if loss != 'bce' else [])
  element = (tff.TensorType(np.int32, [1, maxlen]), tff.TensorType(np.int32, [1, maxlen]),
             tff.TensorType(np.int32, neg_shape))
  data_type = tff.SequenceType(element)
  client_opt = tff.learning.optimizers.build_sgdm(learning_rate=client_learning_rate)

  @tff.tensorflow.computation
  def initial_weights():
    return tff.learning.models.ModelWeights(
        trainable=tuple(tf.constant(w) for w in initial.trainable),
        non_trainable=tuple(tf.constant(w) for w in initial.non_trainable))

  @tf.function
  def _client_update(model, weights, dataset):
    for v, w in zip(model.trainable_variables, weights.trainable):
      v.assign(w)
    for v, w in zip(model.non_trainable_variables, weights.non_trainable):
      v.assign(w)
    variables = model.trainable_variables
    opt_state = client_opt.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables))

    def step(carry, batch):
      opt_state, loss_sum, targets = carry
      seq, pos, neg = batch
      with tf.GradientTape() as tape:
        value = sasrec.sequence_loss(model, seq, pos, neg, loss=loss, training=True)
      grads = tape.gradient(value, variables)
      grads = [tf.convert_to_tensor(g) for g in grads]
      opt_state, updated = client_opt.next(opt_state, tuple(v.read_value() for v in variables),
                                           tuple(grads))
      for v, u in zip(variables, updated):
        v.assign(u)
      n = tf.reduce_sum(tf.cast(pos > 0, tf.float32))
      return opt_state, loss_sum + value * n, targets + n

    _, loss_sum, targets = dataset.reduce((opt_state, tf.constant(0.0), tf.constant(0.0)), step)
    delta = tuple(tf.convert_to_tensor(w) - v.read_value()
                  for w, v in zip(weights.trainable, variables))
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
    delta = tuple(tf.where(finite, d, tf.zeros_like(d)) for d in delta)
    weight = tf.where(finite, targets, 0.0)
    # Divided by the number of steps: each step's targets are the same positions.
    steps = tf.maximum(tf.cast(dataset.reduce(0, lambda n, _: n + 1), tf.float32), 1.0)
    stats = collections.OrderedDict(loss_sum=loss_sum / steps, targets=targets / steps,
                                    non_finite=1.0 - tf.cast(finite, tf.float32))
    return (tff.learning.templates.ClientResult(update=delta, update_weight=weight / steps), stats)

  @tff.tensorflow.computation(w_type, data_type)
  def client_update(weights, dataset):
    model = model_fn()
    # A tf.function orders the variable reads and writes (automatic control
    # dependencies), as TFF's own client works do.
    return _client_update(model, weights, dataset)

  @tff.federated_computation
  def client_init():
    return tff.federated_value((), tff.SERVER)

  @tff.tensorflow.computation
  def finalize_stats(sums):
    n = tf.maximum(sums['targets'], 1.0)
    return collections.OrderedDict(loss=sums['loss_sum'] / n, targets=sums['targets'],
                                   non_finite_updates=sums['non_finite'])

  @tff.federated_computation(client_init.type_signature.result,
                             tff.FederatedType(w_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def client_next(state, weights, data):
    result, stats = tff.federated_map(client_update, (weights, data))
    measurements = tff.federated_map(finalize_stats, tff.federated_sum(stats))
    return tff.templates.MeasuredProcessOutput(state=state, result=result,
                                               measurements=measurements)

  client_work = tff.learning.templates.ClientWorkProcess(client_init, client_next)
  if model_aggregator is None:
    model_aggregator = tff.aggregators.MeanFactory()
  if isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
    model_aggregator = tff.aggregators.factory_utils.as_weighted_aggregator(model_aggregator)
  aggregator = model_aggregator.create(w_type.trainable, tff.TensorType(np.float32))
  server_opt = (tff.learning.optimizers.build_adam(learning_rate=server_learning_rate, beta_2=0.98)
                if server_optimizer == 'adam' else
                tff.learning.optimizers.build_sgdm(learning_rate=server_learning_rate))
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_opt, w_type)
  distributor = tff.learning.templates.build_broadcast_process(w_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights, distributor, client_work, aggregator, finalizer)


def client_dataset(sampler: sequential.TrainingSampler, user: int, steps: int) -> tf.data.Dataset:
  """The device's steps: its window, targets and fresh negatives, `steps` times."""
  seq, pos, neg = zip(*(sampler.user_batch(user) for _ in range(steps)))
  return tf.data.Dataset.from_tensor_slices((np.stack(seq), np.stack(pos), np.stack(neg)))


@dataclasses.dataclass
class FedSequentialResult:
  """What `train` returns (as `sequential.SequentialResult`, per round)."""

  model: sasrec.SASRec
  best_round: int
  valid: dict
  test: dict
  history: list
  seconds_per_round: float


def train(config: FedSequentialConfig, split: sequences.SequenceSplit, *,
          item_text_features: Optional[np.ndarray] = None,
          model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
          on_eval: Optional[Callable[[dict], Any]] = None) -> FedSequentialResult:
  """Federated training; reports the test metrics at the round with the best validation HR@K.

  Args:
    config: The run's configuration.
    split: Sequences with held-out items (one client per user).
    item_text_features: As for `sequential.train`.
    model_aggregator: A `tff.aggregators` factory (default: weighted mean).
    on_eval: Called with each history row as it is made.

  Returns:
    The `FedSequentialResult`.
  """
  c = config.central
  tf.keras.utils.set_random_seed(c.seed)

  def model_fn():
    return sequential.build_model(c, split, item_text_features=item_text_features)

  process = build_process(
      model_fn=model_fn, maxlen=c.maxlen, loss=c.loss, num_negatives=c.num_negatives,
      client_learning_rate=config.client_learning_rate, server_optimizer=config.server_optimizer,
      server_learning_rate=config.server_learning_rate, model_aggregator=model_aggregator)
  sampler = sequential.TrainingSampler(split, c.maxlen, num_negatives=c.num_negatives, seed=c.seed)
  population = sampler.trainable_user_ids
  if config.clients_per_round > population.size:
    raise ValueError(f'clients_per_round={config.clients_per_round} exceeds the '
                     f'{population.size} users with two training items')
  rng = np.random.default_rng([c.seed, 7])
  eval_model = model_fn()
  state = process.initialize()
  book = sequential.BestValidation(c, split, 'round', on_eval)
  seconds = []
  bar = tqdm.trange(config.rounds, desc='fedavg', unit='round', disable=not c.progress_bar)
  for r in range(1, config.rounds + 1):
    start = time.perf_counter()
    users = rng.choice(population, size=config.clients_per_round, replace=False)
    data = [client_dataset(sampler, int(u), config.local_steps) for u in users]
    out = process.next(state, data)
    state = out.state
    seconds.append(time.perf_counter() - start)
    train_metrics = out.metrics['client_work']
    loss = float(train_metrics['loss'])
    if not math.isfinite(loss) or float(train_metrics['non_finite_updates']) > 0:
      raise FloatingPointError(f'non-finite client training at round {r}')
    bar.update(1)
    bar.set_postfix(loss=f'{loss:.4f}')
    if r % config.eval_every and r != config.rounds:
      continue
    weights = process.get_model_weights(state)
    eval_model.set_weights(_ordered(eval_model, weights))
    book.evaluate(eval_model, r, loss, float(np.sum(seconds)))
  bar.close()
  book.restore(eval_model)
  return FedSequentialResult(model=eval_model, best_round=book.best_step, valid=book.valid,
                             test=book.test, history=book.history,
                             seconds_per_round=float(np.median(seconds)))


def _ordered(model: tf.keras.Model, weights: tff.learning.models.ModelWeights) -> list:
  """`weights` in the order of `model.get_weights()` (trainable and non-trainable interleaved)."""
  by_ref = {}
  for v, w in zip(model.trainable_variables, weights.trainable):
    by_ref[v.ref()] = np.asarray(w)
  for v, w in zip(model.non_trainable_variables, weights.non_trainable):
    by_ref[v.ref()] = np.asarray(w)
  return [by_ref[v.ref()] for v in model.weights]
