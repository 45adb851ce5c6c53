"""--dp* flags -> DpConfig, and the run-level checks of prepare_dp_for_run."""

import sys
from absl import app
from absl import flags
import pytest

from experiments import dp_flags
from privacy import federated_dp
from privacy import secure_rounds
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.training import algorithms
from tff_rec.training import experiment


def _flags(*argv):
  fv = flags.FlagValues()
  dp_flags.define_dp_flags(fv)
  dp_flags.define_dp_flags(fv)  # Idempotent.
  fv(['prog', *argv])
  return fv


def test_default_is_no_dp():
  assert not dp_flags.dp_config_from_flags(_flags()).enabled


def test_flags_map_to_the_config():
  config = dp_flags.dp_config_from_flags(_flags(
      '--dp=gaussian_adaptive', '--dp_noise_multiplier=0.7', '--dp_clip=0.2',
      '--dp_target_unclipped_quantile=0.6', '--dp_clip_learning_rate=0.1', '--dp_zeroing',
      '--dp_delta=1e-5', '--target_epsilon=8', '--dp_on_budget=stop', '--dp_accountant=pld'))
  assert config == federated_dp.DpConfig(
      mode='gaussian_adaptive', noise_multiplier=0.7, clip=0.2, target_unclipped_quantile=0.6,
      clip_learning_rate=0.1, zeroing=True, delta=1e-5, target_epsilon=8.0, on_budget='stop',
      accountant='pld')
  tree = dp_flags.dp_config_from_flags(_flags(
      '--dp=tree', '--dp_noise_multiplier=1', '--dp_clip=1', '--dp_restart_rounds=4'))
  assert tree.restart_rounds == 4
  assert dp_flags.dp_config_from_flags(_flags('--dp=ddp', '--dp_noise_multiplier=1',
                                              '--ddp_bits=16')).ddp_bits == 16


@pytest.mark.parametrize('argv, flag', [
    (['--dp_clip=1'], '--dp_clip needs --dp'),
    (['--dp=gaussian_fixed', '--dp_clip=1'], '--dp_noise_multiplier or --target_epsilon'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1'], '--dp_clip'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=-1', '--dp_clip=1'], '--dp_noise_multiplier'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=0'], '--dp_clip'),
    (['--dp=gaussian_adaptive', '--dp_noise_multiplier=1', '--dp_target_unclipped_quantile=2'],
     '--dp_target_unclipped_quantile'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=1', '--dp_delta=1.5'],
     '--dp_delta'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=1', '--target_epsilon=-1'],
     '--target_epsilon'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=1', '--dp_restart_rounds=3'],
     '--dp_restart_rounds'),
    (['--dp=ddp', '--dp_noise_multiplier=1', '--ddp_bits=40'], '--ddp_bits'),
])
def test_invalid_values_raise_usage_errors_naming_the_flag(argv, flag):
  with pytest.raises(app.UsageError, match=flag):
    dp_flags.dp_config_from_flags(_flags(*argv))


@pytest.fixture(scope='module')
def split():
  data = synthetic.synthetic_ratings(num_users=60, num_items=30, seed=3)
  return splits.split_by_user(data.ratings, fractions=(0.8, 0.0, 0.2))


def _config(**algorithm):
  return experiment.FederatedConfig(
      algorithm=algorithms.AlgorithmConfig(**algorithm), clients_per_round=6, total_rounds=30,
      sampling='poisson')


DP = federated_dp.DpConfig('gaussian_fixed', noise_multiplier=1.0, clip=0.5)


def test_prepare_dp_for_run_builds_the_setup(split):
  config, setup = dp_flags.prepare_dp_for_run(DP, _config(name='fedrecon', weighting='uniform'),
                                              split)
  assert setup.population == len(split.train.present_users())
  assert setup.aggregator is not None and setup.total_rounds == 30
  assert config.algorithm.row_sparse_mean is False


def test_prepare_dp_for_run_refuses_weighting(split):
  with pytest.raises(app.UsageError, match='--weighting=uniform'):
    dp_flags.prepare_dp_for_run(DP, _config(name='fedrecon'), split)


def test_prepare_dp_for_run_refuses_over_budget_plans(split):
  with pytest.raises(app.UsageError, match='--dp_on_budget=stop'):
    dp_flags.prepare_dp_for_run(DP.replace(target_epsilon=0.5),
                                _config(name='fedrecon', weighting='uniform'), split)


def test_prepare_dp_for_run_without_dp_changes_nothing(split):
  config = _config(name='fedavg')
  same, setup = dp_flags.prepare_dp_for_run(federated_dp.DpConfig(), config, split)
  assert same is config and setup.aggregator is None and setup.extra_metrics_fn is None


DDP = ('--dp=ddp', '--dp_noise_multiplier=1')


def _secure(*argv, seed=0):
  fv = _flags(*argv)
  return dp_flags.secure_aggregation_from_flags(dp_flags.dp_config_from_flags(fv), seed, fv)


def test_secure_aggregation_flags_map_to_the_config():
  assert not _secure().enabled and not _secure(*DDP).enabled
  config = _secure(*DDP, '--secure_aggregation=secagg_plus', '--secagg_threshold=0.75',
                   '--secagg_degree=8', '--secagg_dropout=0.05', '--secagg_verify', seed=4)
  assert config == secure_rounds.SecureAggregationConfig(
      mode='secagg_plus', threshold=0.75, degree=8, dropout=0.05, seed=4, verify=True)
  assert _secure(*DDP, '--secure_aggregation=he').mode == 'he'


@pytest.mark.parametrize('argv, match', [
    (['--secure_aggregation=secagg'], '--secure_aggregation=secagg needs --dp=ddp'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=1',
      '--secure_aggregation=he'], 'needs --dp=ddp'),
    ([*DDP, '--secagg_dropout=0.1'], '--secagg_dropout needs --secure_aggregation'),
    ([*DDP, '--secure_aggregation=secagg', '--secagg_degree=4'], '--secagg_degree needs'),
    ([*DDP, '--secure_aggregation=he', '--secagg_threshold=0.8'], '--secagg_threshold is for'),
    ([*DDP, '--secure_aggregation=secagg', '--secagg_threshold=0.4'], '--secagg_threshold'),
    ([*DDP, '--secure_aggregation=secagg_plus', '--secagg_degree=5'], '--secagg_degree'),
    ([*DDP, '--secure_aggregation=secagg', '--secagg_dropout=1'], '--secagg_dropout'),
])
def test_bad_secure_aggregation_flags_name_the_flag(argv, match):
  with pytest.raises(app.UsageError, match=match):
    _secure(*argv)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
