"""TFF learning processes by name: FedAvg, FedProx and Federated Reconstruction.

FedAvg and FedProx are TFF's builders. FedRecon is `tff_rec.training.fed_recon`
(TFF's algorithm on the fast client loop, optionally with closed-form
reconstruction) unless `fedrecon_implementation='tff'` selects TFF's
`build_fed_recon`, kept as the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow_federated as tff

from tff_rec.training import aggregators
from tff_rec.training import fed_recon
from tff_rec.training import model_fns
from tff_rec.training import optimizers

ALGORITHMS = ('fedavg', 'fedprox', 'fedrecon')
WEIGHTINGS = ('num_examples', 'uniform')
# How FedAvg/FedProx clients loop over their batches (`tff.learning.LoopImplementation`):
# a Python-side `for` over a dataset iterator, or `tf.data.Dataset.reduce`.
# Same updates either way; on TFF's C++ runtime 'iterator' was several times
# faster per client (see benchmarks/federated_speed.py).
LOOP_IMPLEMENTATIONS = {
    'iterator': tff.learning.LoopImplementation.DATASET_ITERATOR,
    'reduce': tff.learning.LoopImplementation.DATASET_REDUCE,
}
# FedRecon: ours (`fed_recon`, the default) or TFF's `build_fed_recon` (the
# reference: Dataset.reduce loops, gradient reconstruction only).
FEDRECON_IMPLEMENTATIONS = ('fast', 'tff')
RECONSTRUCTIONS = fed_recon.RECONSTRUCTIONS


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """The federated algorithm and its optimizers."""

  name: str = 'fedavg'
  weighting: str = 'num_examples'
  client_optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('sgd', 0.1)
  server_optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('sgd', 1.0)
  reconstruction_optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('sgd', 0.1)
  proximal_strength: float = 0.01  # FedProx mu
  # FedRecon training: how the client data are used for reconstruction.
  recon_epochs: int = 1
  recon_steps_max: Optional[int] = None
  post_recon_steps_max: Optional[int] = None
  split_dataset: bool = False
  # Average each embedding-table row over the clients that touched it (see
  # aggregators.RowSparseMeanFactory) instead of over all clients. False is
  # TFF's plain mean, as in the FedRecon paper. Ignored when an explicit
  # aggregator (DP, compression) is given.
  row_sparse_mean: bool = True
  # FedRecon: how the local part is rebuilt ('gradient': recon_epochs of the
  # reconstruction optimizer; 'closed_form': the exact ridge solution, for
  # models affine in their user-side variables).
  reconstruction: str = 'gradient'

  def __post_init__(self):
    if self.name not in ALGORITHMS:
      raise ValueError(f'unknown algorithm {self.name!r}; valid: {", ".join(ALGORITHMS)}')
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f'unknown weighting {self.weighting!r}; valid: {", ".join(WEIGHTINGS)}')
    if self.name == 'fedprox' and not self.proximal_strength > 0:
      raise ValueError('fedprox needs a positive proximal_strength')
    if self.reconstruction not in RECONSTRUCTIONS:
      raise ValueError(f'unknown reconstruction {self.reconstruction!r}; '
                       f'valid: {", ".join(RECONSTRUCTIONS)}')
    if self.reconstruction == 'closed_form' and self.name != 'fedrecon':
      raise ValueError(f'reconstruction=closed_form is for fedrecon, not {self.name}')

  @property
  def uniform(self) -> bool:
    return self.weighting == 'uniform'


def default_user_embedding(algorithm: str, heldout_users: bool) -> model_fns.UserEmbedding:
  """FedRecon keeps user rows local; FedAvg shares a table (or one row for unseen users)."""
  if algorithm == 'fedrecon':
    return model_fns.UserEmbedding.LOCAL
  return model_fns.UserEmbedding.SHARED if heldout_users else model_fns.UserEmbedding.TABLE


def build_process(
    config: AlgorithmConfig,
    spec: model_fns.ModelSpec,
    user_embedding: model_fns.UserEmbedding,
    model_aggregator=None,
    *,
    loop_implementation: str = 'iterator',
    fedrecon_implementation: str = 'fast',
) -> tff.learning.templates.LearningProcess:
  """The `LearningProcess` for `config` on the model `spec`.

  Args:
    config: The algorithm, its optimizers and settings.
    spec: The model.
    user_embedding: How user-side parameters are held (`default_user_embedding`).
    model_aggregator: A TFF factory (e.g. DP or compression) replacing the
      default mean (the row-sparse mean for embedding tables, or TFF's mean);
      it must be unweighted when `config.weighting == 'uniform'`. Either way
      it is wrapped to count all-zero (non-finite, zeroed) client updates in
      its measurements (`aggregators.count_zeroed_updates`).
    loop_implementation: The client loop (`LOOP_IMPLEMENTATIONS`).
    fedrecon_implementation: FedRecon's builder (`FEDRECON_IMPLEMENTATIONS`):
      'fast' (`fed_recon`) or TFF's 'tff' (the reference).

  Returns:
    A `tff.learning.templates.LearningProcess`.

  Raises:
    ValueError: for a user-embedding variant the algorithm cannot train,
      closed-form reconstruction on a model it does not apply to, or with
      TFF's builder.
  """
  if loop_implementation not in LOOP_IMPLEMENTATIONS:
    raise ValueError(f'unknown loop_implementation {loop_implementation!r}; '
                     f'valid: {", ".join(LOOP_IMPLEMENTATIONS)}')
  if fedrecon_implementation not in FEDRECON_IMPLEMENTATIONS:
    raise ValueError(f'unknown fedrecon_implementation {fedrecon_implementation!r}; '
                     f'valid: {", ".join(FEDRECON_IMPLEMENTATIONS)}')
  client_opt = optimizers.build_optimizer(config.client_optimizer)
  server_opt = optimizers.build_optimizer(config.server_optimizer)
  if model_aggregator is None and config.row_sparse_mean:
    mask = model_fns.embedding_table_mask(spec, user_embedding)
    if any(mask):
      model_aggregator = aggregators.row_sparse_mean(mask, weighted=not config.uniform)
  if model_aggregator is None:
    # TFF's own defaults, made explicit so that they can be wrapped.
    model_aggregator = (tff.aggregators.UnweightedMeanFactory()
                        if config.uniform and config.name != 'fedrecon'
                        else tff.aggregators.MeanFactory())
  # Counts the client updates TFF zeroed for being non-finite (see loop).
  model_aggregator = aggregators.count_zeroed_updates(model_aggregator)
  if config.name == 'fedrecon':
    if user_embedding != model_fns.UserEmbedding.LOCAL:
      raise ValueError('fedrecon needs local user embeddings')
    return _build_fed_recon(config, spec, client_opt, server_opt, model_aggregator,
                            loop_implementation, fedrecon_implementation)

  if user_embedding == model_fns.UserEmbedding.LOCAL:
    raise ValueError(f'{config.name} cannot keep user embeddings local; use fedrecon')
  model_fn = model_fns.tff_model_fn(spec, user_embedding)
  kwargs = dict(
      client_optimizer_fn=client_opt,
      server_optimizer_fn=server_opt,
      model_aggregator=model_aggregator,
      loop_implementation=LOOP_IMPLEMENTATIONS[loop_implementation],
  )
  if config.name == 'fedavg':
    if config.uniform:
      return tff.learning.algorithms.build_unweighted_fed_avg(model_fn, **kwargs)
    return tff.learning.algorithms.build_weighted_fed_avg(model_fn, **kwargs)
  # fedprox
  if config.uniform:
    return tff.learning.algorithms.build_unweighted_fed_prox(
        model_fn, proximal_strength=config.proximal_strength, **kwargs)
  return tff.learning.algorithms.build_weighted_fed_prox(
      model_fn, proximal_strength=config.proximal_strength, **kwargs)


def _build_fed_recon(config: AlgorithmConfig, spec: model_fns.ModelSpec, client_opt, server_opt,
                     model_aggregator, loop_implementation: str,
                     implementation: str) -> tff.learning.templates.LearningProcess:
  """FedRecon by `implementation` (closed form refused where it does not apply)."""
  if config.reconstruction == 'closed_form' and implementation == 'tff':
    raise ValueError("TFF's build_fed_recon has gradient reconstruction only; closed_form needs "
                     "fedrecon_implementation='fast'")
  ridge = model_fns.closed_form_ridge(spec) if config.reconstruction == 'closed_form' else None
  split = fed_recon.DataSplit(
      recon_epochs=config.recon_epochs, recon_steps_max=config.recon_steps_max,
      post_recon_steps_max=config.post_recon_steps_max, split_dataset=config.split_dataset,
  ).for_reconstruction(config.reconstruction)
  weighting = (tff.learning.ClientWeighting.UNIFORM if config.uniform
               else tff.learning.ClientWeighting.NUM_EXAMPLES)
  recon_opt = optimizers.build_optimizer(config.reconstruction_optimizer)
  if implementation == 'tff':
    return tff.learning.algorithms.build_fed_recon(
        model_fns.recon_model_fn(spec),
        loss_fn=model_fns.loss_fn(spec.task),
        metrics_fn=model_fns.metrics_fn(spec.task),
        server_optimizer_fn=server_opt,
        client_optimizer_fn=client_opt,
        reconstruction_optimizer_fn=recon_opt,
        dataset_split_fn=split.tff_split_fn(),
        client_weighting=weighting,
        model_aggregator_factory=model_aggregator,
    )
  return fed_recon.build_fed_recon(
      model_fns.recon_model_fn(spec),
      loss_fn=model_fns.loss_fn(spec.task),
      metrics_fn=model_fns.metrics_fn(spec.task),
      server_optimizer=server_opt,
      client_optimizer=client_opt,
      reconstruction_optimizer=recon_opt,
      split=split,
      client_weighting=weighting,
      model_aggregator=model_aggregator,
      loop_implementation=LOOP_IMPLEMENTATIONS[loop_implementation],
      ridge=ridge,
  )
