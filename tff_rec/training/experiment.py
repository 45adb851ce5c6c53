"""One federated training run, end to end, from a config (the binaries' core)."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import numpy as np
import tensorflow_federated as tff

from tff_rec import runtime
from tff_rec import version
from tff_rec.data import federated
from tff_rec.data import splits as splits_lib
from tff_rec.models import base
from tff_rec.models import metrics as metrics_lib
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import artifacts
from tff_rec.training import data_setup
from tff_rec.training import evaluation
from tff_rec.training import execution as execution_lib
from tff_rec.training import loop
from tff_rec.training import model_fns
from tff_rec.training import optimizers
from tff_rec.training import run_dir as run_dir_lib
from tff_rec.training import sampling


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A registry model name and its hyperparameters."""

  name: str = 'mf'
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.name not in registry.MODEL_NAMES:
      raise ValueError(f'unknown model {self.name!r}; valid: {", ".join(registry.MODEL_NAMES)}')


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """What defines a federated run's result (the result flags of run_federated).

  How and where it runs is `execution.ExecutionConfig`.
  """

  data: data_setup.DataConfig = data_setup.DataConfig()
  model: ModelConfig = ModelConfig()
  algorithm: algorithms.AlgorithmConfig = algorithms.AlgorithmConfig()
  clients_per_round: int = 50
  total_rounds: int = 10
  client_epochs: int = 1
  batch_size: int = 32
  max_examples_per_user: Optional[int] = None
  # Implicit-feedback models: unrated items sampled per rating on each client
  # (label 0; ratings become label 1), fresh every round. 0 for rating models.
  negatives_per_positive: int = 0
  sampling: str = 'fixed_size'
  eval_every: int = 5
  eval_clients: Optional[int] = None  # users per periodic evaluation (None: all)
  recon_eval: evaluation.ReconEvalConfig = evaluation.ReconEvalConfig()
  finetune_eval: bool = False
  seed: int = 0

  def __post_init__(self):
    for name in ('clients_per_round', 'total_rounds', 'client_epochs', 'batch_size', 'eval_every'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.max_examples_per_user is not None and self.max_examples_per_user <= 0:
      raise ValueError('max_examples_per_user must be positive')
    if self.eval_clients is not None and self.eval_clients <= 0:
      raise ValueError('eval_clients must be positive')
    if self.negatives_per_positive < 0:
      raise ValueError('negatives_per_positive must be >= 0')


def model_spec(config: FederatedConfig, split: splits_lib.Split) -> model_fns.ModelSpec:
  """The model spec over the split's catalog, seeded by the run seed."""
  hparams = dict(config.model.hparams)
  task = registry.default_task(config.model.name, **hparams)
  if (task == base.TASK_RATING and 'global_mean' in registry.hparam_names(config.model.name)
      and 'global_mean' not in hparams):
    hparams['global_mean'] = split.train.global_mean()
  builder = functools.partial(registry.build_model, config.model.name, **hparams)
  return model_fns.ModelSpec(
      builder=builder,
      num_users=split.train.num_users,
      num_items=split.train.num_items,
      task=task,
      seed=config.seed,
      name=config.model.name,
  )


def _sample_eval(users: list[str], n: Optional[int], seed: int) -> Callable[[int], list[str]]:
  def select(round_num: int) -> list[str]:
    if n is None or n >= len(users):
      return users
    rng = np.random.default_rng([seed, 7919, round_num])
    return sorted(rng.choice(users, size=n, replace=False).tolist(), key=int)
  return select


@dataclasses.dataclass
class RunResult:
  run_dir: str
  test_metrics: dict
  state: Any
  final_model_dir: str
  seconds: float


def run_federated(
    config: FederatedConfig,
    execution: execution_lib.ExecutionConfig = execution_lib.ExecutionConfig(),
    *,
    split: Optional[splits_lib.Split] = None,
    model_aggregator=None,
    extra_metrics_fn: Optional[Callable[[int], Mapping[str, Any]]] = None,
    total_rounds: Optional[int] = None,
    hparams_extra: Optional[Mapping[str, Any]] = None,
    process_transform: Optional[Callable[[Any], Any]] = None,
) -> RunResult:
  """Trains per `config` (resuming if the run directory has a checkpoint), evaluates on test.

  Args:
    config: What defines the result.
    execution: How and where it runs (`execution.run_dir` is the run directory).
    split: The data split (default: loaded from `config.data`).
    model_aggregator: A TFF aggregation factory (DP, compression) replacing
      the default mean.
    extra_metrics_fn: `round -> metrics` added to each round's metrics (e.g. ε).
    total_rounds: Rounds to run instead of `config.total_rounds` (e.g. fewer
      within a DP budget).
    hparams_extra: More JSON-ready entries for `hparams.json`.
    process_transform: Applied to the training process (composed with the
      client datasets, so its data are client ids) before the loop runs it;
      it must keep `initialize`, `next` and `get_model_weights` and the state
      type (e.g. `privacy.secure_rounds.wrap`, secure sums by protocol).

  Returns:
    The run directory, test metrics, final state, final model directory and
    seconds.

  Raises:
    ValueError: for a configuration that cannot run (e.g. more clients per
      round than training users).
  """
  started = time.time()
  split = split or data_setup.load_split(config.data)
  logging.info('%s', split.summary())
  train_users = split.train.present_users()
  if config.clients_per_round > len(train_users):
    raise ValueError(
        f'clients_per_round={config.clients_per_round} exceeds the {len(train_users)} training users'
    )
  spec = model_spec(config, split)
  if config.algorithm.reconstruction == 'closed_form':
    model_fns.closed_form_ridge(spec)  # ValueError naming the model where it does not apply.
  user_embedding = algorithms.default_user_embedding(config.algorithm.name, split.heldout_users)
  implicit = spec.task == base.TASK_IMPLICIT
  if implicit and (config.negatives_per_positive <= 0 or split.negatives is None):
    raise ValueError('implicit models train with negatives_per_positive > 0 and are evaluated '
                     'on a leave-one-out split with sampled negatives (e.g. ncf-ml-1m)')
  if not implicit and config.negatives_per_positive:
    raise ValueError('negatives_per_positive is for implicit models only')
  run_dir = execution.run_dir
  hparams = {
      'config': dataclasses.asdict(config),
      'execution': dataclasses.asdict(execution),
      'user_embedding': user_embedding.value,
      'split': split.summary(),
      'versions': version.installed_versions(),
      **(hparams_extra or {}),
  }
  # Before anything is written: a resumed run must have the same result config.
  run_dir_lib.check_resume(run_dir, hparams, default_config=dataclasses.asdict(FederatedConfig()),
                           allow_change=execution.allow_config_change)
  with run_dir_lib.lock(run_dir):
    return _train_and_evaluate(config, execution, split, spec, user_embedding, hparams,
                               model_aggregator, extra_metrics_fn, total_rounds, started,
                               process_transform)


def _train_and_evaluate(config: FederatedConfig, execution: execution_lib.ExecutionConfig,
                        split: splits_lib.Split, spec: model_fns.ModelSpec,
                        user_embedding: model_fns.UserEmbedding, hparams: dict,
                        model_aggregator, extra_metrics_fn, total_rounds: Optional[int],
                        started: float,
                        process_transform: Optional[Callable[[Any], Any]] = None) -> RunResult:
  """The body of `run_federated`, with the run directory locked."""
  run_dir = execution.run_dir
  # Checked again under the lock: a concurrent run may have written it since.
  run_dir_lib.check_resume(run_dir, hparams, default_config=dataclasses.asdict(FederatedConfig()),
                           allow_change=execution.allow_config_change)
  artifacts.write_json(os.path.join(run_dir, 'hparams.json'), hparams)
  execution_lib.install_runtime(execution)
  implicit = spec.task == base.TASK_IMPLICIT
  train_users = split.train.present_users()

  process = algorithms.build_process(
      config.algorithm, spec, user_embedding, model_aggregator,
      loop_implementation=execution.loop_implementation,
      fedrecon_implementation=execution.fedrecon_implementation)
  train_data = federated.client_data(
      split.train,
      federated.ClientDatasetConfig(
          batch_size=config.batch_size,
          num_epochs=config.client_epochs,
          max_examples_per_user=config.max_examples_per_user,
          seed=config.seed,
          negatives_per_positive=config.negatives_per_positive,
      ),
      storage_dir=execution.client_data_dir,
  )
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      train_data.dataset_computation, process
  )
  if process_transform is not None:
    composed = process_transform(composed)
  sampler = sampling.ClientSampler(train_users, config.clients_per_round, config.seed, config.sampling)

  def evaluator_for(part) -> Optional[evaluation.FederatedEvaluator]:
    if part.num_ratings == 0:
      return None
    return evaluation.FederatedEvaluator(
        spec, user_embedding,
        support=None if split.heldout_users else split.train,
        query=part,
        batch_size=config.batch_size,
        max_support_per_user=config.max_examples_per_user,
        recon=config.recon_eval,
        heldout_users=split.heldout_users,
        implementation=execution.fedrecon_implementation,
    )

  if implicit:
    # HR@K / NDCG@K of the global model, centrally. FedRecon's local user
    # rows need per-user reconstruction first (tff_rec.training.local_recon).
    val_eval = None
    periodic = (None if user_embedding == model_fns.UserEmbedding.LOCAL
                else RankingEvaluator(spec, user_embedding, split))
  else:
    val_eval = evaluator_for(split.val) if split.val.num_ratings else None
    periodic = val_eval or evaluator_for(split.test)
  sample_eval = _sample_eval(periodic.user_ids if periodic else [], config.eval_clients, config.seed)
  rounds = total_rounds or config.total_rounds
  last_eval = {}

  def eval_selection(round_num: int):
    # No evaluation of the untrained model at round 0 (TFF's loop asks).
    return None if round_num == 0 else (round_num, sample_eval(round_num))

  def evaluate(weights, selection):
    if selection is None:
      return {}
    round_num, ids = selection
    metrics = periodic(weights, ids)
    last_eval.update(round=round_num, all_users=len(ids) == len(periodic.user_ids), metrics=metrics)
    return metrics

  state = execution_lib.train_with_worker_restarts(execution, lambda: loop.run(
      composed,
      sampler,
      run_dir,
      loop.LoopConfig(
          total_rounds=rounds,
          eval_every=config.eval_every,
          checkpoint_every=execution.checkpoint_every,
          progress_bar=execution.progress_bar,
          max_zeroed_share=execution.max_zeroed_client_share,
      ),
      evaluation_fn=evaluate if periodic else None,
      evaluation_selection_fn=eval_selection,
      extra_metrics_fn=extra_metrics_fn,
  ))
  weights = process.get_model_weights(state)
  if periodic is not val_eval and last_eval.get('round') == rounds and last_eval['all_users']:
    test_metrics = dict(last_eval['metrics'])  # The last periodic evaluation was this one.
  elif implicit:
    test_metrics = dict(periodic(weights)) if periodic else {}
  else:
    test_eval = evaluator_for(split.test) if periodic is val_eval else periodic
    test_metrics = dict(test_eval(weights))
  if config.finetune_eval and user_embedding == model_fns.UserEmbedding.SHARED:
    if split.heldout_users:
      test = federated.cap_latest(split.test, config.max_examples_per_user)
      support, query = evaluation.alternate_batches(test, config.batch_size)
    else:
      support, query = split.train, split.test
    finetune = evaluation.FinetuneEvaluator(
        spec, user_embedding, support, query, batch_size=config.batch_size,
        finetune_optimizer=config.algorithm.client_optimizer)
    test_metrics.update(finetune(weights))
  artifacts.write_json(os.path.join(run_dir, 'test_metrics.json'), test_metrics)

  rec = spec.build(user_embedding)
  assign_global_weights(rec, user_embedding, weights)
  final_dir = artifacts.save_final_model(
      run_dir, rec.keras_model, split.train,
      {
          'model': config.model.name,
          'hparams': dict(spec.builder.keywords),
          'task': spec.task,
          'num_users': spec.num_users,
          'num_items': spec.num_items,
          'user_embedding': user_embedding.value,
          'algorithm': config.algorithm.name,
          'rounds': rounds,
          'seed': config.seed,
          'rating_scale': list(split.train.rating_scale),
          'test_metrics': test_metrics,
      },
  )
  return RunResult(run_dir, test_metrics, state, final_dir, time.time() - started)


class RankingEvaluator:
  """HR@K and NDCG@K of global weights on a leave-one-out test part (NCF protocol)."""

  def __init__(self, spec: model_fns.ModelSpec, user_embedding: model_fns.UserEmbedding,
               split: splits_lib.Split, top_k: int = 10):
    if user_embedding == model_fns.UserEmbedding.LOCAL:
      raise ValueError('local user rows must be reconstructed before ranking')
    self._rec = spec.build(user_embedding)
    self._user_embedding = user_embedding
    self._test = split.test
    self._negatives = split.negatives
    self._top_k = top_k
    self.user_ids = [federated.client_id(u) for u in split.test.present_users()]

  def __call__(self, model_weights: Any, user_ids=None) -> dict:
    del user_ids  # Every test case is ranked (cheap: 100 scores per user).
    assign_global_weights(self._rec, self._user_embedding, model_weights)
    result = metrics_lib.hit_rate_and_ndcg_sampled(
        metrics_lib.keras_score_fn(self._rec.keras_model), self._test.users, self._test.items,
        self._negatives, self._top_k)
    k = self._top_k
    return {f'hr@{k}': result['hit_rate'], f'ndcg@{k}': result['ndcg'],
            'num_users': int(self._test.num_ratings)}


def assign_global_weights(rec, user_embedding: model_fns.UserEmbedding, weights) -> None:
  """Copies TFF `ModelWeights` into a built model (its global part for FedRecon)."""
  if user_embedding != model_fns.UserEmbedding.LOCAL:
    weights.assign_weights_to(rec.keras_model)
    return
  trainable = [v for v in rec.global_variables if v.trainable]
  non_trainable = [v for v in rec.global_variables if not v.trainable]
  for var, value in zip(trainable + non_trainable, list(weights.trainable) + list(weights.non_trainable)):
    var.assign(value)


def summary_line(result: RunResult) -> str:
  """One human line: where the run is and its test metrics."""
  shown = ', '.join(
      f'{k}={v:.4f}' for k, v in result.test_metrics.items() if isinstance(v, float)
  )
  return f'{result.run_dir}: test {shown} ({result.seconds:.0f}s)'
