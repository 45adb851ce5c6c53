"""The one place a federated run is assembled: DP, secure intrinsics, compression, byte counts.

`prepare_run` takes a result configuration (`FederatedConfig`), how it
executes (`ExecutionConfig`), its split and the DP and compression choices,
and returns what `tff_rec.training.experiment.run_federated` needs. The
federated binary (`experiments/run_federated.py`) and the published tables
(`experiments/tables/`) both call it, so DP, the secure context that
distributed DP needs, the compression aggregator and byte counting are set
up the same way everywhere. It lives in `experiments/` because it combines
`privacy/` and `compression/`, which build on `tff_rec/` side by side
(tests/layering_test.py).

Refusals raise `RunSetupError`, whose message starts with the flag it is
about; the binaries turn it into a usage error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from compression import comm
from privacy import accounting
from privacy import dp_aggregators
from privacy import federated_dp
from privacy import secure_rounds
from tff_rec.training import algorithms
from tff_rec.training import execution as execution_lib
from tff_rec.training import experiment
from tff_rec.training import model_fns


class RunSetupError(ValueError):
  """A run that must not start; the message names the flag (e.g. `--dp=...: ...`)."""


@dataclasses.dataclass(frozen=True)
class PreparedRun:
  """What `prepare_run` returns.

  Attributes:
    config: The result configuration, as adjusted (e.g. DP turns the
      row-sparse mean off).
    execution: The execution configuration, as adjusted (secure intrinsics).
    run_kwargs: Keyword arguments of `experiment.run_federated` besides the
      two configs (split, aggregator, per-round metrics, round budget,
      hparams extras).
    dp: The DP set-up (accountant, ε after any round); mode 'none' without DP.
    comm: Bytes up and down per client and round (`comm.CommStats`).
  """

  config: experiment.FederatedConfig
  execution: execution_lib.ExecutionConfig
  run_kwargs: dict
  dp: federated_dp.DpSetup
  comm: comm.CommStats


def prepare_dp(dp_config: dp_aggregators.DpConfig, config: experiment.FederatedConfig,
               split: Any) -> tuple[experiment.FederatedConfig, federated_dp.DpSetup]:
  """DP for a run: its aggregator, accountant and round budget.

  Args:
    dp_config: The DP choice (`DpConfig()` for none).
    config: The run's result configuration.
    split: Its split (the training population sets the sampling rate).

  Returns:
    (config, setup). With DP the config has `algorithm.row_sparse_mean=False`
    (the DP aggregator replaces the default one; recorded so hparams.json is
    truthful). When the mode needs secure sums ('ddp'),
    `setup.needs_secure_context` is set.

  Raises:
    RunSetupError: DP refused for this run (weighting, user table, budget).
  """
  if not dp_config.enabled:
    return config, federated_dp.prepare_dp(
        dp_config, clients_per_round=config.clients_per_round, population=1,
        total_rounds=config.total_rounds, sampling=config.sampling,
        weighting=config.algorithm.weighting, user_embedding=None)
  user_embedding = algorithms.default_user_embedding(config.algorithm.name, split.heldout_users)
  population = len(split.train.present_users())
  try:
    setup = federated_dp.prepare_dp(
        dp_config,
        clients_per_round=config.clients_per_round,
        population=population,
        total_rounds=config.total_rounds,
        sampling=config.sampling,
        weighting=config.algorithm.weighting,
        user_embedding=user_embedding,
    )
  except accounting.BudgetExceededError as e:
    raise RunSetupError(
        f'--target_epsilon={dp_config.target_epsilon} with --total_rounds='
        f'{config.total_rounds}: {e} (use --dp_on_budget=stop to run only those rounds, '
        'or raise --dp_noise_multiplier)') from e
  except ValueError as e:
    message = str(e)
    if not message.startswith('--'):
      message = f'--dp={dp_config.mode}: {message}'
    raise RunSetupError(message) from e
  config = dataclasses.replace(
      config, algorithm=dataclasses.replace(config.algorithm, row_sparse_mean=False))
  return config, setup


def prepare_run(
    config: experiment.FederatedConfig,
    execution: execution_lib.ExecutionConfig,
    split: Any,
    *,
    dp_config: dp_aggregators.DpConfig = dp_aggregators.DpConfig(),
    compression: str = 'none',
    compression_threshold: int = comm.DEFAULT_THRESHOLD,
    compression_zeroing: bool = True,
    compression_clipping: bool = True,
    secure_aggregation: secure_rounds.SecureAggregationConfig = (
        secure_rounds.SecureAggregationConfig()),
) -> PreparedRun:
  """Everything a federated run needs besides its configs.

  Args:
    config: The result configuration.
    execution: How it executes; `secure_intrinsics` is turned on when the DP
      mode needs secure sums.
    split: The run's split.
    dp_config: User-level DP (default: none).
    compression: Upload compression (`comm.MODES`).
    compression_threshold: Tensors with fewer elements are not compressed.
    compression_zeroing: TFF's adaptive zeroing around a compressed mean.
    compression_clipping: TFF's adaptive L2 clipping around a compressed mean
      (without DP; DP clips by its own rule).
    secure_aggregation: How distributed DP's secure sums run (default: TFF's
      simulated intrinsic); a protocol needs dp mode 'ddp'. Its seed is the
      run's seed.

  Returns:
    A `PreparedRun`: run it with
    `experiment.run_federated(p.config, p.execution, **p.run_kwargs)`.

  Raises:
    RunSetupError: Naming the flag: more clients per round than users,
      closed-form reconstruction on a model it does not apply to, DP refused,
      or a DP/compression combination that would break the guarantee, or a
      secure-aggregation protocol without distributed DP.
  """
  population = len(split.train.present_users())
  if config.clients_per_round > population:
    raise RunSetupError(f'--clients_per_round={config.clients_per_round} exceeds the population '
                        f'of {population} training users')
  if config.algorithm.reconstruction == 'closed_form':
    try:
      model_fns.closed_form_ridge(experiment.model_spec(config, split))
    except ValueError as e:
      raise RunSetupError(
          f'--reconstruction=closed_form with --model={config.model.name}: {e}') from e
  if secure_aggregation.enabled and dp_config.mode != 'ddp':
    raise RunSetupError(f'--secure_aggregation={secure_aggregation.mode}: needs --dp=ddp, whose '
                        f'updates are the integer vectors a secure sum adds (got --dp='
                        f'{dp_config.mode})')
  config, dp = prepare_dp(dp_config, config, split)
  if dp.needs_secure_context:
    execution = dataclasses.replace(execution, secure_intrinsics=True)
  weighted = not config.algorithm.uniform
  dp_kwargs = {'dp_factory': dp.aggregator}
  if (compression != 'none' and dp_config.enabled and dp_config.mode in dp_aggregators.QUERY_MODES
      and not dp_config.zeroing):
    # Quantized transport inside the DP clip (see compression.comm).
    dp_kwargs = {'dp_query': dp_aggregators.build_query(dp.config, config.clients_per_round)}
  try:
    aggregator = comm.build_compression_aggregator(
        compression, weighted=weighted, threshold=compression_threshold,
        zeroing=compression_zeroing, clipping=compression_clipping, **dp_kwargs)
  except ValueError as e:
    raise RunSetupError(f'--compression={compression}: {e}') from e
  spec = experiment.model_spec(config, split)
  user_embedding = algorithms.default_user_embedding(config.algorithm.name, split.heldout_users)
  stats = comm.aggregator_comm_stats(aggregator, spec, user_embedding, weighted=weighted,
                                     row_sparse_mean=config.algorithm.row_sparse_mean)
  extra = comm.combine_metrics_fns(dp.extra_metrics_fn,
                                   comm.comm_metrics_fn(stats, config.clients_per_round))
  compression_record = {'mode': compression, 'threshold': compression_threshold}
  if compression != 'none' and not dp_config.enabled:
    # TFF's adaptive zeroing / clipping around the compressed mean (DP clips by its own rule).
    compression_record.update(zeroing=compression_zeroing, clipping=compression_clipping)
  kwargs = dict(
      split=split, model_aggregator=aggregator, extra_metrics_fn=extra,
      total_rounds=dp.total_rounds,
      hparams_extra={'dp': dp.report(), 'compression': compression_record})
  if secure_aggregation.enabled:
    secure_aggregation = dataclasses.replace(secure_aggregation, seed=config.seed)
    kwargs['process_transform'] = functools.partial(secure_rounds.wrap, config=secure_aggregation)
    kwargs['hparams_extra']['secure_aggregation'] = secure_aggregation.report()
  return PreparedRun(config, execution, kwargs, dp, stats)
