"""Federated evaluation of a trained global model on held-out users or ratings.

- `table` models (FedAvg/FedProx, users seen in training): TFF's
  `build_fed_eval` on each user's query ratings.
- `local` models (FedRecon): `fed_recon.build_fed_recon_eval` (or TFF's
  `build_fed_recon_eval` with `implementation='tff'`); the user embedding is
  rebuilt on the device from its support ratings, then the query ratings are
  scored. For users seen in training the support set is their training
  ratings; for unseen users it is every other batch of their data (TFF's
  `split_dataset=True`), as in Singhal et al. 2021.
- `shared` models (FedAvg baseline for unseen users): `build_fed_eval` as is,
  and, with `finetune_steps`, TFF's personalization evaluation, which
  fine-tunes the whole model on the support half first.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import federated
from tff_rec.data import ratings as ratings_lib
from tff_rec.training import fed_recon
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@dataclasses.dataclass(frozen=True)
class ReconEvalConfig:
  """Reconstruction settings at evaluation (FedRecon's recon_* flags)."""

  optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('sgd', 0.1)
  recon_epochs: int = 1
  recon_steps_max: Optional[int] = None
  post_recon_steps_max: Optional[int] = None
  # As in `algorithms.AlgorithmConfig`: gradient steps or the closed form.
  reconstruction: str = 'gradient'

  def __post_init__(self):
    fed_recon.check_reconstruction(self.reconstruction)


def _recon_eval_process(spec: model_fns.ModelSpec, input_spec, recon: ReconEvalConfig,
                        split: fed_recon.DataSplit, implementation: str):
  """FedRecon evaluation by `implementation`."""
  model_fn = model_fns.recon_model_fn(spec, input_spec=input_spec)
  optimizer = optimizers.build_optimizer(recon.optimizer)
  if implementation == 'tff':
    return tff.learning.algorithms.build_fed_recon_eval(
        model_fn,
        loss_fn=model_fns.loss_fn(spec.task),
        metrics_fn=model_fns.metrics_fn(spec.task),
        reconstruction_optimizer_fn=optimizer,
        dataset_split_fn=split.tff_split_fn(),
    )
  return fed_recon.build_fed_recon_eval(
      model_fn,
      loss_fn=model_fns.loss_fn(spec.task),
      metrics_fn=model_fns.metrics_fn(spec.task),
      reconstruction_optimizer=optimizer,
      split=split,
      ridge=model_fns.closed_form_ridge(spec) if recon.reconstruction == 'closed_form' else None,
  )


class FederatedEvaluator:
  """Evaluates global model weights on a set of users, as TFF computations."""

  def __init__(
      self,
      spec: model_fns.ModelSpec,
      user_embedding: model_fns.UserEmbedding,
      support: Optional[ratings_lib.Ratings],
      query: ratings_lib.Ratings,
      *,
      batch_size: int = 32,
      max_support_per_user: Optional[int] = None,
      recon: ReconEvalConfig = ReconEvalConfig(),
      heldout_users: bool = False,
      implementation: str = 'fast',
  ):
    """Builds the evaluation computation.

    Args:
      spec: The model.
      user_embedding: How user-side parameters are held.
      support: Ratings a user's model may adapt to (None for held-out users,
        whose own ratings are split instead).
      query: The ratings scored.
      batch_size: Evaluation batch size.
      max_support_per_user: Keep each user's latest N support ratings.
      recon: FedRecon's reconstruction at evaluation.
      heldout_users: The users were not in training (every other batch of
        their data reconstructs, as in Singhal et al. 2021).
      implementation: FedRecon evaluation by 'fast' (`fed_recon`) or TFF's
        'tff' builder.

    Raises:
      ValueError: closed-form reconstruction with TFF's builder, or on a model
        where it does not apply.
    """
    if implementation not in ('fast', 'tff'):
      raise ValueError(f'unknown implementation {implementation!r}; valid: fast, tff')
    if recon.reconstruction == 'closed_form' and implementation == 'tff':
      raise ValueError("TFF's build_fed_recon_eval has gradient reconstruction only")
    self.user_embedding = user_embedding
    self.heldout_users = heldout_users
    reconstructs = user_embedding == model_fns.UserEmbedding.LOCAL
    if heldout_users:
      # Unseen users: their ratings are both support and query (split later).
      data = query if support is None else _merge(support, query)
      data = federated.cap_latest(data, max_support_per_user)
      self.client_data = federated.eval_client_data(None, data, batch_size, max_support_per_user)
      spec_in = federated.element_spec()
    elif reconstructs:
      self.client_data = federated.eval_client_data(support, query, batch_size, max_support_per_user)
      spec_in = federated.eval_element_spec()
    else:
      # The user's own (trained) row scores its query ratings directly.
      self.client_data = federated.eval_client_data(None, query, batch_size)
      spec_in = federated.element_spec()
    self.user_ids = list(self.client_data.client_ids)
    if reconstructs:
      # Unseen users: every other batch reconstructs (TFF's split_dataset=True),
      # as in Singhal et al. 2021; seen users: support rows reconstruct.
      split = fed_recon.DataSplit(
          recon_epochs=recon.recon_epochs,
          recon_steps_max=recon.recon_steps_max,
          post_recon_steps_max=recon.post_recon_steps_max,
          split_dataset=heldout_users,
          by_query_marker=not heldout_users,
      ).for_reconstruction(recon.reconstruction)
      process = _recon_eval_process(spec, spec_in, recon, split, implementation)
    else:
      process = tff.learning.algorithms.build_fed_eval(
          model_fns.tff_model_fn(spec, user_embedding, input_spec=spec_in)
      )
    self._process = process
    self._composed = tff.simulation.compose_dataset_computation_with_learning_process(
        self.client_data.dataset_computation, process
    )
    self._state = process.initialize()

  def __call__(self, model_weights: Any, user_ids: Optional[Sequence[str]] = None) -> collections.OrderedDict:
    """Metrics of `model_weights` over `user_ids` (default: all users)."""
    ids = self.user_ids if user_ids is None else list(user_ids)
    state = self._process.set_model_weights(self._state, model_weights)
    output = self._composed.next(state, ids)
    metrics = output.metrics['client_work']['eval']['current_round_metrics']
    return collections.OrderedDict((k, _to_python(v)) for k, v in metrics.items())


def alternate_batches(r: ratings_lib.Ratings, batch_size: int) -> tuple[ratings_lib.Ratings, ratings_lib.Ratings]:
  """Per user, even batches (in time order) as support, odd ones as query.

  The same partition TFF's `split_dataset=True` makes of an unseen user's
  data in FedRecon evaluation, so fine-tuning baselines see the same rows.
  """
  s = r.sorted_by_user()
  offsets = s.user_offsets()
  position = np.arange(s.num_ratings) - offsets[s.users]
  even = (position // batch_size) % 2 == 0
  return s.select(even, name=f'{r.name}/support'), s.select(~even, name=f'{r.name}/query')


def _to_python(v):
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()


def _merge(a: ratings_lib.Ratings, b: ratings_lib.Ratings) -> ratings_lib.Ratings:
  return dataclasses.replace(
      a,
      users=np.concatenate([a.users, b.users]),
      items=np.concatenate([a.items, b.items]),
      ratings=np.concatenate([a.ratings, b.ratings]),
      timestamps=np.concatenate([a.timestamps, b.timestamps]),
  )


class FinetuneEvaluator:
  """FedAvg + local fine-tuning (TFF personalization evaluation)."""

  def __init__(
      self,
      spec: model_fns.ModelSpec,
      user_embedding: model_fns.UserEmbedding,
      support: ratings_lib.Ratings,
      query: ratings_lib.Ratings,
      *,
      batch_size: int = 32,
      finetune_epochs: int = 1,
      finetune_optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('sgd', 0.1),
      max_clients: int = 10000,
  ):
    self._support = support
    self._query = query
    self._batch_size = batch_size
    self.user_ids = [int(u) for u in query.present_users()]
    model_fn = model_fns.tff_model_fn(spec, user_embedding)
    keras_opt = optimizers.build_keras_optimizer
    epochs = finetune_epochs
    evaluate = _make_evaluate(batch_size)

    def finetune_fn():
      # Builds a tf.function (personalize_fn contract) for one client.
      opt = keras_opt(finetune_optimizer)

      @tf.function
      def personalize(model, train_data, test_data, context=None):
        del context
        variables = model.trainable_variables
        opt.build(variables)
        for _ in tf.range(epochs):
          for batch in train_data.batch(batch_size):
            with tf.GradientTape() as tape:
              output = model.forward_pass(batch, training=True)
            grads = tape.gradient(output.loss, variables)
            opt.apply_gradients(zip(grads, variables))
        return evaluate(model, test_data)

      return personalize

    self._computation = tff.learning.algorithms.build_personalization_eval_computation(
        model_fn,
        personalize_fn_dict=collections.OrderedDict(finetune=finetune_fn),
        baseline_evaluate_fn=evaluate,
        max_num_clients=max_clients,
    )

  def _client_input(self, user: int) -> collections.OrderedDict:
    def ds(r: ratings_lib.Ratings):
      sel = r.users == user
      return tf.data.Dataset.from_tensor_slices(
          collections.OrderedDict(
              x=collections.OrderedDict(user=r.users[sel], item=r.items[sel]),
              y=r.ratings[sel],
          )
      )  # Unbatched: TFF's personalization evaluation expects examples.

    return collections.OrderedDict(train_data=ds(self._support), test_data=ds(self._query))

  def __call__(self, model_weights: Any, user_ids: Optional[Sequence[int]] = None) -> collections.OrderedDict:
    """Example-weighted metrics without (`baseline/`) and with (`finetune/`) fine-tuning."""
    users = self.user_ids if user_ids is None else list(user_ids)
    data = [self._client_input(u) for u in users]
    out = self._computation(model_weights, data)
    result = collections.OrderedDict()
    for name, prefix in (('baseline_metrics', 'baseline'), ('finetune', 'finetune')):
      sums = {k: float(np.sum(v)) for k, v in out[name].items()}
      n = max(sums['num_examples'], 1.0)
      result[f'{prefix}/rmse'] = float(np.sqrt(sums['squared_error'] / n))
      result[f'{prefix}/mae'] = sums['absolute_error'] / n
      result[f'{prefix}/rating_accuracy'] = sums['within_half'] / n
      result[f'{prefix}/loss'] = sums['loss_sum'] / n
    result['num_examples'] = int(sums['num_examples'])
    return result


def _make_evaluate(batch_size: int):
  """A tf.function: per-client sums of loss, errors, |error| <= 0.5, count."""

  @tf.function
  def evaluate(model, dataset) -> collections.OrderedDict:
    return _sums(model, dataset.batch(batch_size))

  return evaluate


def _sums(model, dataset) -> collections.OrderedDict:
  sums = collections.OrderedDict(
      loss_sum=tf.constant(0.0), squared_error=tf.constant(0.0), absolute_error=tf.constant(0.0),
      within_half=tf.constant(0.0), num_examples=tf.constant(0.0))
  for batch in dataset:
    output = model.forward_pass(batch, training=False)
    n = tf.cast(output.num_examples, tf.float32)
    err = tf.cast(output.predictions, tf.float32) - tf.cast(batch['y'], tf.float32)
    sums['loss_sum'] += tf.cast(output.loss, tf.float32) * n
    sums['squared_error'] += tf.reduce_sum(tf.square(err))
    sums['absolute_error'] += tf.reduce_sum(tf.abs(err))
    sums['within_half'] += tf.reduce_sum(tf.cast(tf.abs(err) <= 0.5, tf.float32))
    sums['num_examples'] += n
  return sums
