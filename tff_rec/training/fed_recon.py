"""Federated Reconstruction (Singhal et al. 2021) on the fast client loop.

The same algorithm as TFF's `tff.learning.algorithms.build_fed_recon` and
`build_fed_recon_eval`, composed from TFF's own parts
(`tff.learning.templates.ClientWorkProcess`, `compose_learning_process`,
`build_broadcast_process`, `build_apply_optimizer_finalizer`,
`tff.learning.metrics.sum_then_finalize`) with client-side changes that TFF
0.87 does not offer, which is why the client work is written here:

* each client reads its dataset once, with a dataset iterator
  (`tff.learning.LoopImplementation.DATASET_ITERATOR`, as FedAvg does here),
  into tensors, and takes its reconstruction and training steps over them.
  TFF's builder runs a `tf.data.Dataset.reduce` per phase over datasets
  split with `enumerate().filter()`: every pass creates a tf.data iterator,
  which costs more than a client's whole MF computation on TFF's C++
  runtime (see benchmarks/federated_speed.py);
* `reconstruction='closed_form'`: for models whose prediction is affine in
  the local (user-side) variables with a squared loss (biased MF, GMF with a
  rating head), the reconstruction objective is a ridge regression and is
  solved exactly (`closed_form_reconstruct`) instead of by gradient steps.

Which batches reconstruct and which train follows TFF's
`ReconstructionModel.build_dataset_split_fn` rules (`DataSplit`). Everything
else follows TFF's code (variable creation and initialization, optimizer
calls, metrics, non-finite update zeroing, client weighting), so with
`reconstruction='gradient'` the processes give the same model and metrics as
TFF's builders up to float summation order (tests/training/fed_recon_test.py).
`algorithms.AlgorithmConfig` keeps TFF's builder selectable as the reference
(`fedrecon_implementation='tff'`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
# Not exported by TFF 0.87; the same one `build_fed_recon_eval` uses.
from tensorflow_federated.python.learning.templates import finalizers as tff_finalizers

from tff_rec.data import federated

RECONSTRUCTIONS = ('gradient', 'closed_form')

LossFn = Callable[[], tf.keras.losses.Loss]
MetricsFn = Callable[[], list]
SplitFn = Callable[[tf.data.Dataset], tuple[tf.data.Dataset, tf.data.Dataset]]
ReconstructionModel = tff.learning.models.ReconstructionModel


def check_reconstruction(reconstruction: str) -> None:
  """ValueError unless `reconstruction` is one of `RECONSTRUCTIONS`."""
  if reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f'unknown reconstruction {reconstruction!r}; valid: {", ".join(RECONSTRUCTIONS)}')


@dataclasses.dataclass(frozen=True)
class DataSplit:
  """Which of a client's batches reconstruct and which come after (train or evaluate).

  TFF's `ReconstructionModel.build_dataset_split_fn` rules: with
  `split_dataset`, even-indexed batches reconstruct and odd-indexed ones
  come after, else all batches do both; each side is repeated for its epochs,
  then cut at its maximum number of steps. With `by_query_marker` (the
  evaluation of users seen in training), batches whose `x['query']` marker is
  set are evaluated and the others reconstruct (the marker is dropped before
  the model sees a batch).
  """

  recon_epochs: int = 1
  recon_steps_max: Optional[int] = None
  post_recon_epochs: int = 1
  post_recon_steps_max: Optional[int] = None
  split_dataset: bool = False
  by_query_marker: bool = False

  def __post_init__(self):
    for name in ('recon_epochs', 'post_recon_epochs'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    for name in ('recon_steps_max', 'post_recon_steps_max'):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.split_dataset and self.by_query_marker:
      raise ValueError('split_dataset and by_query_marker are exclusive')

  def for_reconstruction(self, reconstruction: str) -> 'DataSplit':
    """The split a reconstruction reads.

    Closed-form reconstruction solves the objective of all `recon_epochs`
    passes at once (repeating the same batches scales it, not its
    minimizer), so it reads the reconstruction batches once unless
    `recon_steps_max` cuts across epochs.
    """
    check_reconstruction(reconstruction)
    if reconstruction == 'closed_form' and self.recon_steps_max is None:
      return dataclasses.replace(self, recon_epochs=1)
    return self

  def tff_split_fn(self) -> SplitFn:
    """The same split as a TFF `ReconstructionDatasetSplitFn` (for TFF's builders)."""
    if not self.by_query_marker:
      return ReconstructionModel.build_dataset_split_fn(
          recon_epochs=self.recon_epochs, recon_steps_max=self.recon_steps_max,
          post_recon_epochs=self.post_recon_epochs, post_recon_steps_max=self.post_recon_steps_max,
          split_dataset=self.split_dataset)

    def split(dataset: tf.data.Dataset):
      # Support and query rows are batched separately: filter whole batches.
      support = dataset.filter(lambda b: tf.logical_not(b['x'][federated.QUERY_KEY][0])).map(federated.strip_query)
      query = dataset.filter(lambda b: b['x'][federated.QUERY_KEY][0]).map(federated.strip_query)
      support = support.repeat(self.recon_epochs)
      if self.recon_steps_max is not None:
        support = support.take(self.recon_steps_max)
      query = query.repeat(self.post_recon_epochs)
      if self.post_recon_steps_max is not None:
        query = query.take(self.post_recon_steps_max)
      return support, query

    return split

  def indices(self, num_batches: tf.Tensor, is_query: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(reconstruction batch indices, post-reconstruction batch indices), in step order."""
    every = tf.range(num_batches)
    if self.by_query_marker:
      recon, post = tf.boolean_mask(every, ~is_query), tf.boolean_mask(every, is_query)
    elif self.split_dataset:
      recon, post = every[0::2], every[1::2]
    else:
      recon = post = every
    return (_repeat_and_cut(recon, self.recon_epochs, self.recon_steps_max),
            _repeat_and_cut(post, self.post_recon_epochs, self.post_recon_steps_max))


def _repeat_and_cut(idx: tf.Tensor, epochs: int, steps_max: Optional[int]) -> tf.Tensor:
  idx = tf.tile(idx, [epochs])
  return idx if steps_max is None else idx[:steps_max]


class _Batches:
  """A client's batches as tensor arrays (see `_read_batches`)."""

  def __init__(self, spec, arrays, is_query, count):
    self._spec = spec
    self._arrays = arrays
    self.is_query = is_query
    self.count = count

  def read(self, index: tf.Tensor):
    leaves = []
    for array, spec in zip(self._arrays, tf.nest.flatten(self._spec)):
      t = array.read(index)
      t.set_shape(spec.shape)
      leaves.append(t)
    return tf.nest.pack_sequence_as(self._spec, leaves)


def _read_batches(dataset: tf.data.Dataset, loop: tff.learning.LoopImplementation) -> _Batches:
  """Reads a client's dataset once into tensor arrays (and its batches' query markers).

  A plain function, not a method, so that AutoGraph converts its loop.
  """
  spec = dataset.element_spec
  marked = isinstance(spec, collections.abc.Mapping) and federated.QUERY_KEY in spec.get('x', {})
  if marked:
    spec = federated.strip_query(spec)
  leaves = tf.nest.flatten(spec)

  def write(state, batch):
    arrays, flags, n = state
    if marked:
      flags = flags.write(n, batch['x'][federated.QUERY_KEY][0])
      batch = federated.strip_query(batch)
    arrays = tuple(a.write(n, t) for a, t in zip(arrays, tf.nest.flatten(batch)))
    return arrays, flags, n + 1

  # Tuples, not lists: `Dataset.reduce` would try to stack a list into one tensor.
  empty = (tuple(tf.TensorArray(s.dtype, size=0, dynamic_size=True, infer_shape=False,
                                element_shape=tf.TensorShape(None)) for s in leaves),
           tf.TensorArray(tf.bool, size=0, dynamic_size=True), tf.constant(0))
  arrays, flags, count = _fold(dataset, write, empty, loop)
  is_query = tf.reshape(flags.stack(), [-1]) if marked else tf.zeros([count], tf.bool)
  return _Batches(spec, arrays, is_query, count)


def _fold(dataset: tf.data.Dataset, fn: Callable[[Any, Any], Any], state: Any,
          loop: tff.learning.LoopImplementation) -> Any:
  """Folds `fn(state, batch)` over `dataset` with the chosen TFF loop."""
  if loop == tff.learning.LoopImplementation.DATASET_REDUCE:
    return dataset.reduce(initial_state=state, reduce_func=fn)
  for batch in iter(dataset):
    state = fn(state, batch)
  return state


def _fold_indices(batches: _Batches, indices: tf.Tensor, fn: Callable[[Any, Any], Any],
                  state: Any) -> Any:
  """Folds `fn(state, batch)` over the batches at `indices`, in order."""
  for k in tf.range(tf.size(indices)):
    state = fn(state, batches.read(indices[k]))
  return state


def _specs(variables) -> tuple:
  return tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables)


def _dense_gradients(grads, variables) -> tuple:
  """Gradients as dense tensors with their variables' static shapes.

  Embedding lookups give `IndexedSlices` of unknown row count; TFF's
  optimizers densify them anyway, and loop state (e.g. momentum) must keep
  its shape across steps.
  """
  return tuple(tf.reshape(tf.convert_to_tensor(g), v.shape) for g, v in zip(grads, variables))


def gradient_reconstruct(model: ReconstructionModel, loss: tf.keras.losses.Loss,
                         optimizer: tff.learning.optimizers.Optimizer, batches: _Batches,
                         indices: tf.Tensor) -> None:
  """Trains the local trainable variables on the batches at `indices`, global ones frozen.

  One `optimizer` step per batch on the batch loss, as TFF's FedRecon does.
  """
  local = list(ReconstructionModel.get_local_variables(model).trainable)

  def step(opt_state, batch):
    with tf.GradientTape() as tape:
      output = model.forward_pass(batch, training=True)
      batch_loss = loss(y_true=output.labels, y_pred=output.predictions)
    grads = _dense_gradients(tape.gradient(batch_loss, local), local)
    opt_state, updated = optimizer.next(opt_state, tuple(local), grads)
    for var, value in zip(local, updated):
      var.assign(value)
    return opt_state

  _fold_indices(batches, indices, step, optimizer.initialize(_specs(local)))


def normal_equation_terms(predictions_fn: Callable[[], tf.Tensor], local: Sequence[tf.Variable],
                          labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """One batch's `(mean_j x_j x_j^T, mean_j x_j (y_j - a_j))` (float64), see `closed_form_reconstruct`.

  `predictions_fn()` computes the batch's predictions from the model; the
  local variables must be 0 (the predictions are then `a_j` and their
  Jacobian holds the rows `x_j`).
  """
  with tf.GradientTape() as tape:
    predictions = tf.reshape(tf.cast(predictions_fn(), tf.float32), [-1])
  jacobians = tape.jacobian(predictions, list(local), experimental_use_pfor=True)
  n = tf.shape(predictions)[0]
  x = tf.concat([tf.reshape(j, [n, -1]) for j in jacobians], axis=1)
  x.set_shape([None, sum(int(v.shape.num_elements()) for v in local)])
  x = tf.cast(x, tf.float64)
  residual = tf.cast(tf.reshape(labels, [-1]), tf.float64) - tf.cast(predictions, tf.float64)
  weight = 1.0 / tf.cast(tf.maximum(n, 1), tf.float64)
  return (weight * tf.matmul(x, x, transpose_a=True),
          weight * tf.linalg.matvec(x, residual, transpose_a=True))


def solve_normal_equations(gram: tf.Tensor, rhs: tf.Tensor, num_batches: tf.Tensor,
                           ridge: Sequence[float], local: Sequence[tf.Variable]) -> None:
  """Assigns the local variables the solution of the summed normal equations plus ridge.

  Solved in float64 with the pseudo-inverse: the float64 sums keep an exactly
  rank-deficient system (no ridge, fewer ratings than unknowns)
  rank-deficient, so this is the minimum-norm minimizer (0 without batches)
  instead of amplified rounding noise.
  """
  sizes = [int(v.shape.num_elements()) for v in local]
  if len(ridge) != len(local):
    raise ValueError(f'closed_form: {len(ridge)} ridge coefficients for {len(local)} local variables')
  penalty = tf.constant(np.repeat(np.asarray(ridge, np.float64), sizes), tf.float64)
  system = gram + tf.linalg.diag(tf.cast(num_batches, tf.float64) * penalty)
  theta = tf.cast(tf.linalg.matvec(tf.linalg.pinv(system), rhs), tf.float32)
  start = 0
  for var, size in zip(local, sizes):
    var.assign(tf.reshape(theta[start:start + size], var.shape))
    start += size


def closed_form_reconstruct(model: ReconstructionModel, ridge: Sequence[float],
                            batches: _Batches, indices: tf.Tensor) -> None:
  """Sets the local trainable variables to the exact minimizer of the reconstruction objective.

  The gradient path minimizes, over the local variables theta with the global
  ones fixed, the sum over reconstruction batches b of
  `mean_{j in b} (y_j - f_j(theta))^2 + sum_k ridge_k * ||theta_k||^2`
  (the MSE of the batch plus the row L2 of `base.EmbeddingLookup`, whose
  gradient is `2 * l2 * theta` per batch for the one on-device row).
  When `f_j(theta) = a_j + x_j . theta` is affine (biased MF, rating GMF),
  the minimizer solves
  `(sum_b mean_{j in b} x_j x_j^T + n_b * diag(ridge)) theta
     = sum_b mean_{j in b} x_j (y_j - a_j)`.
  The rows `x_j` are the Jacobian of the predictions at theta = 0 (where the
  L2 term of the lookup's gradient vanishes) and `a_j` the predictions there
  (`normal_equation_terms`); `solve_normal_equations` solves it.
  """
  local = list(ReconstructionModel.get_local_variables(model).trainable)
  if len(ridge) != len(local):
    raise ValueError(f'closed_form: {len(ridge)} ridge coefficients for {len(local)} local variables')
  dim = sum(int(v.shape.num_elements()) for v in local)
  for var in local:
    var.assign(tf.zeros_like(var))

  def accumulate(state, batch):
    gram, rhs, count = state
    d_gram, d_rhs = normal_equation_terms(
        lambda: model.forward_pass(batch, training=True).predictions, local, batch['y'])
    return gram + d_gram, rhs + d_rhs, count + 1

  gram, rhs, count = _fold_indices(
      batches, indices, accumulate,
      (tf.zeros([dim, dim], tf.float64), tf.zeros([dim], tf.float64), tf.constant(0)))
  solve_normal_equations(gram, rhs, count, ridge, local)


def _reconstruct(model, loss, optimizer, ridge, batches: _Batches, indices: tf.Tensor) -> None:
  if not ReconstructionModel.get_local_variables(model).trainable:
    return
  if ridge is not None:
    closed_form_reconstruct(model, ridge, batches, indices)
  else:
    gradient_reconstruct(model, loss, optimizer, batches, indices)


def _metric_list(loss_fn: LossFn, metrics_fn: Optional[MetricsFn]) -> list:
  loss_metric = tf.keras.metrics.MeanMetricWrapper(loss_fn(), name='loss')
  return (metrics_fn() if metrics_fn is not None else []) + [loss_metric]


def _register_finalizers(metrics: list, finalizers: collections.OrderedDict) -> None:
  for metric in metrics:
    if metric.name in finalizers:
      raise ValueError(f'Duplicate metric name detected: {metric.name}. '
                       f'Already saw metrics {list(finalizers)}')
    finalizers[metric.name] = tff.learning.metrics.create_keras_metric_finalizer(metric)


def _types(model_fn: Callable[[], ReconstructionModel]):
  """(no-arg TF computation of the initial global weights, TFF type of a client dataset)."""
  with tf.Graph().as_default():
    model = model_fn()
    if not isinstance(model, ReconstructionModel):
      raise TypeError(f'model_fn must return a tff.learning.models.ReconstructionModel, got {type(model)}')
    dataset_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))

  @tff.tensorflow.computation
  def initial_weights():
    return ReconstructionModel.get_global_variables(model_fn())

  return initial_weights, dataset_type


def _assign(variables, values) -> None:
  for var, value in zip(tf.nest.flatten(variables), tf.nest.flatten(values)):
    var.assign(value)


def _zero_all_if_any_non_finite(structure):
  """TFF's `tensor_utils.zero_all_if_any_non_finite`: (structure or zeros, 1 if zeroed)."""
  flat = tf.nest.flatten(structure)
  if not flat:
    return structure, tf.constant(0)
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in flat])
  return tf.cond(
      finite,
      lambda: (structure, tf.constant(0)),
      lambda: (tf.nest.map_structure(tf.zeros_like, structure), tf.constant(1)))


def build_client_work(
    model_fn: Callable[[], ReconstructionModel],
    *,
    loss_fn: LossFn,
    metrics_fn: Optional[MetricsFn],
    client_optimizer: tff.learning.optimizers.Optimizer,
    reconstruction_optimizer: tff.learning.optimizers.Optimizer,
    split: DataSplit,
    client_weighting: tff.learning.ClientWeighting,
    loop_implementation: tff.learning.LoopImplementation,
    ridge: Optional[Sequence[float]] = None,
) -> tff.learning.templates.ClientWorkProcess:
  """FedRecon's client work: reconstruct the local part, then train the global part.

  Args:
    model_fn: No-arg constructor of the `ReconstructionModel` (must build new
      variables on every call).
    loss_fn: No-arg constructor of the training loss.
    metrics_fn: No-arg constructor of the Keras metrics (on post-reconstruction
      batches only), or None.
    client_optimizer: Trains the global variables after reconstruction.
    reconstruction_optimizer: Trains the local variables (gradient path only).
    split: Which batches reconstruct and which train.
    client_weighting: `tff.learning.ClientWeighting.NUM_EXAMPLES` or `UNIFORM`.
    loop_implementation: How a client reads its dataset (once).
    ridge: If given, closed-form reconstruction with these L2 coefficients
      (one per local trainable variable); None for gradient steps.

  Returns:
    A stateless `tff.learning.templates.ClientWorkProcess` whose result is
    `ClientResult(initial - final global trainable weights, weight)` and whose
    measurements are `{'train': metrics}`.
  """
  initial_weights, dataset_type = _types(model_fn)
  weights_type = initial_weights.type_signature.result
  finalizers = collections.OrderedDict()

  @tff.tensorflow.computation(weights_type, dataset_type)
  @tf.function
  def client_update(incoming_weights, dataset):
    with tf.init_scope():
      model = model_fn()
      metrics = _metric_list(loss_fn, metrics_fn)
      if not finalizers:
        _register_finalizers(metrics, finalizers)
      loss = loss_fn()
    global_weights = ReconstructionModel.get_global_variables(model)
    _assign(global_weights, incoming_weights)
    global_trainable = list(global_weights.trainable)
    batches = _read_batches(dataset, loop_implementation)
    recon_idx, post_idx = split.indices(batches.count, batches.is_query)
    _reconstruct(model, loss, reconstruction_optimizer, ridge, batches, recon_idx)

    def train_step(state, batch):
      num_examples, opt_state = state
      with tf.GradientTape() as tape:
        output = model.forward_pass(batch, training=True)
        batch_loss = loss(y_true=output.labels, y_pred=output.predictions)
      grads = _dense_gradients(tape.gradient(batch_loss, global_trainable), global_trainable)
      opt_state, updated = client_optimizer.next(opt_state, tuple(global_trainable), grads)
      for var, value in zip(global_trainable, updated):
        var.assign(value)
      for metric in metrics:
        metric.update_state(y_true=output.labels, y_pred=output.predictions)
      return num_examples + output.num_examples, opt_state

    num_examples, _ = _fold_indices(
        batches, post_idx, train_step,
        (tf.constant(0), client_optimizer.initialize(_specs(global_trainable))))
    final = type(incoming_weights.trainable)(v.read_value() for v in global_trainable)
    delta = tf.nest.map_structure(tf.subtract, incoming_weights.trainable, final)
    delta, non_finite = _zero_all_if_any_non_finite(delta)
    unfinalized = ReconstructionModel.read_metric_variables(metrics)
    if non_finite > 0:
      weight = tf.constant(0.0, tf.float32)
    elif client_weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
      weight = tf.cast(num_examples, tf.float32)
    else:
      weight = tf.constant(1.0, tf.float32)
    return tff.learning.templates.ClientResult(delta, weight), unfinalized

  @tff.federated_computation
  def initialize():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      tff.FederatedType((), tff.SERVER),
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(dataset_type, tff.CLIENTS),
  )
  def next_fn(state, weights, datasets):
    del state
    result, unfinalized = tff.federated_map(client_update, (weights, datasets))
    aggregate = tff.learning.metrics.sum_then_finalize(finalizers, unfinalized.type_signature.member)
    measurements = tff.federated_zip(collections.OrderedDict(train=aggregate(unfinalized)))
    return tff.templates.MeasuredProcessOutput(
        state=tff.federated_value((), tff.SERVER), result=result, measurements=measurements)

  return tff.learning.templates.ClientWorkProcess(initialize, next_fn)


def build_fed_recon(
    model_fn: Callable[[], ReconstructionModel],
    *,
    loss_fn: LossFn,
    metrics_fn: Optional[MetricsFn] = None,
    server_optimizer: tff.learning.optimizers.Optimizer,
    client_optimizer: tff.learning.optimizers.Optimizer,
    reconstruction_optimizer: tff.learning.optimizers.Optimizer,
    split: DataSplit = DataSplit(),
    client_weighting: tff.learning.ClientWeighting = tff.learning.ClientWeighting.NUM_EXAMPLES,
    model_aggregator: Optional[Any] = None,
    loop_implementation: tff.learning.LoopImplementation = (
        tff.learning.LoopImplementation.DATASET_ITERATOR),
    ridge: Optional[Sequence[float]] = None,
) -> tff.learning.templates.LearningProcess:
  """The FedRecon `LearningProcess`, like `tff.learning.algorithms.build_fed_recon`.

  Args:
    model_fn: No-arg constructor of the `ReconstructionModel`.
    loss_fn: No-arg constructor of the training loss.
    metrics_fn: No-arg constructor of the Keras metrics, or None.
    server_optimizer: Applies the aggregated update on the server.
    client_optimizer: Trains the global variables on the client.
    reconstruction_optimizer: Reconstructs the local variables (gradient path).
    split: Which batches reconstruct and which train.
    client_weighting: Weighting of client updates in the mean.
    model_aggregator: A weighted or unweighted `tff.aggregators` factory
      (default: `tff.aggregators.MeanFactory()`); an unweighted one needs
      `ClientWeighting.UNIFORM`.
    loop_implementation: How a client reads its dataset (iterator: fast).
    ridge: Per-local-variable L2 for closed-form reconstruction
      (`model_fns.closed_form_ridge`), or None for gradient steps.

  Returns:
    A `tff.learning.templates.LearningProcess` with TFF's FedRecon state and
    metrics structure (`client_work/train/...`).

  Raises:
    ValueError: if an unweighted aggregator is combined with non-uniform
      weighting.
  """
  initial_weights, _ = _types(model_fn)
  weights_type = initial_weights.type_signature.result
  if model_aggregator is None:
    model_aggregator = tff.aggregators.MeanFactory()
  if isinstance(model_aggregator, tff.aggregators.UnweightedAggregationFactory):
    if client_weighting != tff.learning.ClientWeighting.UNIFORM:
      raise ValueError('an unweighted aggregator needs ClientWeighting.UNIFORM, got '
                       f'{client_weighting}')
    model_aggregator = tff.aggregators.as_weighted_aggregator(model_aggregator)
  aggregator = model_aggregator.create(weights_type.trainable, tff.TensorType(np.float32))
  client_work = build_client_work(
      model_fn, loss_fn=loss_fn, metrics_fn=metrics_fn, client_optimizer=client_optimizer,
      reconstruction_optimizer=reconstruction_optimizer, split=split,
      client_weighting=client_weighting, loop_implementation=loop_implementation, ridge=ridge)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type)
  return tff.learning.templates.compose_learning_process(
      initial_weights, tff.learning.templates.build_broadcast_process(weights_type),
      client_work, aggregator, finalizer)


def build_fed_recon_eval(
    model_fn: Callable[[], ReconstructionModel],
    *,
    loss_fn: LossFn,
    metrics_fn: Optional[MetricsFn] = None,
    reconstruction_optimizer: tff.learning.optimizers.Optimizer,
    split: DataSplit = DataSplit(split_dataset=True),
    loop_implementation: tff.learning.LoopImplementation = (
        tff.learning.LoopImplementation.DATASET_ITERATOR),
    ridge: Optional[Sequence[float]] = None,
) -> tff.learning.templates.LearningProcess:
  """FedRecon evaluation, like `tff.learning.algorithms.build_fed_recon_eval`.

  Each client reconstructs its local variables on its reconstruction batches
  (gradient steps, or the closed form with `ridge`) and evaluates the others;
  metrics are summed then finalized over clients. The process has TFF's
  evaluation structure: `next(state, data).metrics['client_work']['eval']
  ['current_round_metrics']`, and `set_model_weights` to load a model.

  Args:
    model_fn: No-arg constructor of the `ReconstructionModel`.
    loss_fn: No-arg constructor of the loss (reconstruction and metric).
    metrics_fn: No-arg constructor of the Keras metrics, or None.
    reconstruction_optimizer: Reconstructs the local variables (gradient path).
    split: Which batches reconstruct and which are evaluated.
    loop_implementation: How a client reads its dataset (once).
    ridge: Per-local-variable L2 for closed-form reconstruction, or None.

  Returns:
    A `tff.learning.templates.LearningProcess` that never changes the model.
  """
  initial_weights, dataset_type = _types(model_fn)
  weights_type = initial_weights.type_signature.result
  finalizers = collections.OrderedDict()

  @tff.tensorflow.computation(weights_type, dataset_type)
  @tf.function
  def client_eval(incoming_weights, dataset):
    with tf.init_scope():
      model = model_fn()
      metrics = _metric_list(loss_fn, metrics_fn)
      if not finalizers:
        _register_finalizers(metrics, finalizers)
      loss = loss_fn()
    _assign(ReconstructionModel.get_global_variables(model), incoming_weights)
    batches = _read_batches(dataset, loop_implementation)
    recon_idx, eval_idx = split.indices(batches.count, batches.is_query)
    _reconstruct(model, loss, reconstruction_optimizer, ridge, batches, recon_idx)

    def eval_step(num_examples, batch):
      output = model.forward_pass(batch, training=False)
      for metric in metrics:
        metric.update_state(y_true=output.labels, y_pred=output.predictions)
      return num_examples + output.num_examples

    _fold_indices(batches, eval_idx, eval_step, tf.constant(0))
    return ReconstructionModel.read_metric_variables(metrics)

  metrics_process = tff.learning.metrics.SumThenFinalizeFactory(finalizers).create(
      client_eval.type_signature.result)

  @tff.federated_computation
  def work_initialize():
    return metrics_process.initialize()

  @tff.federated_computation(
      work_initialize.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(dataset_type, tff.CLIENTS),
  )
  def work_next(state, weights, datasets):
    unfinalized = tff.federated_map(client_eval, (weights, datasets))
    output = metrics_process.next(state, unfinalized)
    current, total = output.result
    measurements = tff.federated_zip(collections.OrderedDict(
        eval=collections.OrderedDict(current_round_metrics=current, total_rounds_metrics=total)))
    empty = tff.federated_value(tff.learning.templates.ClientResult(update=(), update_weight=()),
                                tff.CLIENTS)
    return tff.templates.MeasuredProcessOutput(output.state, empty, measurements)

  client_work = tff.learning.templates.ClientWorkProcess(work_initialize, work_next)
  empty_type = tff.FederatedType(
      tff.learning.templates.ClientResult(update=(), update_weight=()), tff.CLIENTS).member
  aggregator = tff.aggregators.MeanFactory().create(empty_type.update, empty_type.update_weight)
  finalizer = tff_finalizers.build_identity_finalizer(
      weights_type, update_type=empty_type.update_weight)
  return tff.learning.templates.compose_learning_process(
      initial_weights, tff.learning.templates.build_broadcast_process(weights_type),
      client_work, aggregator, finalizer)
