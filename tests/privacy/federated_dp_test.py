"""prepare_dp: refusals, budgets, running epsilon, samplers, and a DP learning process."""

import sys
import collections
import csv
import functools
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from experiments import dp_flags
from privacy import accounting
from privacy import federated_dp
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import execution
from tff_rec.training import experiment
from tff_rec.training import model_fns

DpConfig = federated_dp.DpConfig
UE = model_fns.UserEmbedding
N, M, T = 943, 50, 40


def _prepare(config, **kw):
  args = dict(clients_per_round=M, population=N, total_rounds=T, sampling='poisson',
              weighting='uniform', user_embedding=UE.LOCAL)
  args.update(kw)
  return federated_dp.prepare_dp(config, **args)


FIXED = DpConfig('gaussian_fixed', noise_multiplier=1.0, clip=0.5)


# --- Refusals ---------------------------------------------------------------


def test_weighted_aggregation_with_dp_is_refused():
  with pytest.raises(ValueError, match=r'--dp=gaussian_fixed needs --weighting=uniform'):
    _prepare(FIXED, weighting='num_examples')


def test_user_table_with_dp_is_refused_recommending_fedrecon():
  with pytest.raises(ValueError, match='--algorithm=fedrecon'):
    _prepare(FIXED, user_embedding=UE.TABLE)
  with pytest.raises(ValueError, match='--algorithm=fedrecon'):
    _prepare(FIXED, user_embedding='table')


def test_row_sparse_mean_with_dp_is_refused():
  with pytest.raises(ValueError, match='row-sparse'):
    _prepare(FIXED, row_sparse_mean=True)


def test_shared_and_local_user_embeddings_are_accepted():
  assert _prepare(FIXED, user_embedding=UE.SHARED).aggregator is not None
  assert _prepare(FIXED, user_embedding=UE.LOCAL).aggregator is not None


@pytest.mark.parametrize('config, sampling, match', [
    (DpConfig('tree', noise_multiplier=1.0, clip=1.0), 'fixed_size', '--sampling=shuffled_epochs'),
    (DpConfig('tree', noise_multiplier=1.0, clip=1.0), 'poisson', '--sampling=shuffled_epochs'),
    (DpConfig('ddp', noise_multiplier=0.5), 'poisson', '--sampling=fixed_size'),
    (DpConfig('gaussian_fixed', noise_multiplier=1.0, clip=1.0, accountant='pld'), 'fixed_size',
     '--dp_accountant=pld'),
    (DpConfig('gaussian_fixed', noise_multiplier=1.0, clip=1.0), 'shuffled_epochs', '--sampling'),
])
def test_sampling_the_accountant_cannot_analyse_is_refused(config, sampling, match):
  with pytest.raises(ValueError, match=match):
    _prepare(config, sampling=sampling)


def test_tree_restarts_must_align_with_epochs():
  # Epoch length ceil(943 / 50) = 19 rounds; 4 does not divide it.
  with pytest.raises(ValueError, match='--dp_restart_rounds'):
    _prepare(DpConfig('tree', noise_multiplier=1.0, clip=1.0, restart_rounds=4),
             sampling='shuffled_epochs')


def test_no_dp_passes_everything_through():
  setup = _prepare(DpConfig(), weighting='num_examples', user_embedding=UE.TABLE)
  assert setup.aggregator is None and setup.extra_metrics_fn is None
  assert setup.total_rounds == T and not setup.enabled
  assert setup.report() == {'mode': 'none'}


# --- Budgets ----------------------------------------------------------------


def test_over_budget_plan_is_refused_before_training():
  tracker = accounting.EpsilonTracker(1.0, M, N, accounting.default_delta(N))
  target = tracker.epsilon_after(T) * 0.8
  config = FIXED.replace(target_epsilon=target, on_budget='refuse')
  with pytest.raises(accounting.BudgetExceededError) as e:
    _prepare(config)
  assert e.value.rounds == T
  assert e.value.max_rounds == tracker.max_rounds_within(target, upper=T)


@pytest.mark.parametrize('sampling', ['poisson', 'fixed_size'])
def test_on_budget_stop_runs_exactly_the_rounds_within_budget(sampling, caplog):
  delta = accounting.default_delta(N)
  tracker = accounting.EpsilonTracker(1.0, M, N, delta, sampling=sampling)
  target = 0.5 * (tracker.epsilon_after(20) + tracker.epsilon_after(21))
  setup = _prepare(FIXED.replace(target_epsilon=target, on_budget='stop'), sampling=sampling)
  assert setup.total_rounds == 20
  assert setup.requested_rounds == T
  assert setup.epsilon_after(20) <= target < setup.epsilon_after(21)
  # The message states the budget, the rounds, and the epsilon reached.
  assert f'target epsilon {target:g}' in caplog.text
  assert f'allows 20 of the {T} requested rounds; training stops after round 20' in caplog.text
  assert f'at epsilon {tracker.epsilon_after(20):.4g}' in caplog.text


def test_plan_within_budget_runs_all_rounds():
  setup = _prepare(FIXED.replace(target_epsilon=1e3))
  assert setup.total_rounds == T


def test_noise_multiplier_is_calibrated_from_the_budget():
  setup = _prepare(DpConfig('gaussian_fixed', clip=1.0, target_epsilon=3.0))
  assert setup.calibrated
  eps = setup.epsilon_after(T)
  assert eps <= 3.0 and eps == pytest.approx(3.0, rel=1e-3)
  assert setup.report()['noise_multiplier_calibrated'] is True


def test_zero_noise_gives_infinite_epsilon_and_cannot_meet_a_budget():
  setup = _prepare(DpConfig('gaussian_fixed', noise_multiplier=0.0, clip=1.0))
  assert setup.extra_metrics_fn(3)['dp/epsilon'] == math.inf
  with pytest.raises(ValueError, match='target_epsilon'):
    _prepare(DpConfig('gaussian_fixed', noise_multiplier=0.0, clip=1.0, target_epsilon=5.0))


# --- Running epsilon ----------------------------------------------------------


@pytest.mark.parametrize('mode, sampling, accountant', [
    ('gaussian_fixed', 'poisson', 'rdp'),
    ('gaussian_fixed', 'poisson', 'pld'),
    ('gaussian_fixed', 'fixed_size', 'rdp'),
    ('gaussian_adaptive', 'poisson', 'rdp'),
    ('ddp', 'fixed_size', 'rdp'),
])
def test_running_epsilon_equals_compute_epsilon(mode, sampling, accountant):
  config = DpConfig(mode, noise_multiplier=0.8, clip=0.5, accountant=accountant)
  setup = _prepare(config, sampling=sampling)
  delta = accounting.default_delta(N)
  metrics = setup.extra_metrics_fn
  for rounds in (1, 7, T):
    plan = accounting.DpPlan(0.8, M, N, rounds, delta, sampling)
    m = metrics(rounds)
    assert list(m) == ['dp/epsilon', 'dp/delta']
    assert m['dp/epsilon'] == pytest.approx(accounting.compute_epsilon(plan, accountant), rel=1e-9)
    assert m['dp/delta'] == delta
  assert metrics(0)['dp/epsilon'] == 0.0


@pytest.mark.parametrize('mode', ['tree', 'tree_adaptive'])
def test_running_epsilon_of_the_tree_modes(mode):
  setup = _prepare(DpConfig(mode, noise_multiplier=2.0, clip=0.5), sampling='shuffled_epochs')
  assert setup.restart_rounds == 19  # One tree per epoch.
  delta = accounting.default_delta(N)
  for rounds in (5, 19, 33):
    expected = accounting.tree_aggregation_epsilon(2.0, M, N, rounds, delta, 19)
    assert setup.extra_metrics_fn(rounds)['dp/epsilon'] == pytest.approx(expected, rel=1e-9)


def test_report_is_json_and_honest_about_coverage():
  setup = _prepare(DpConfig('gaussian_adaptive', noise_multiplier=1.0, zeroing=True))
  report = json.loads(json.dumps(setup.report()))
  assert report['unit'] == 'user'
  assert report['neighboring_relation'] == 'ADD_OR_REMOVE_ONE'
  assert report['epsilon'] == pytest.approx(setup.epsilon_after(T))
  assert report['value_noise_multiplier'] > 1.0
  text = ' '.join(report['not_covered'])
  assert 'evaluation metrics' in text and 'zeroing' in text and 'number of clients' in text


def test_ddp_needs_the_secure_context():
  setup = _prepare(DpConfig('ddp', noise_multiplier=0.5), sampling='fixed_size')
  assert setup.needs_secure_context
  assert setup.report()['epsilon_is_gaussian_approximation']
  assert not _prepare(FIXED).needs_secure_context


# --- Epoch sampler ------------------------------------------------------------


def test_epoch_shuffle_sampler_uses_every_user_once_per_epoch():
  users = np.arange(3, 26)  # 23 users, 5 per round -> epochs of 5 rounds.
  sampler = federated_dp.EpochShuffleSampler(users, 5, seed=1)
  assert sampler.epoch_rounds == 5
  for epoch in range(3):
    chosen = [sampler.users_for_round(epoch * 5 + k) for k in range(1, 6)]
    flat = np.concatenate(chosen)
    assert sorted(flat.tolist()) == users.tolist()
    assert [len(c) for c in chosen] == [5, 5, 5, 5, 3]
  assert sampler(1) == federated_dp.EpochShuffleSampler(users, 5, seed=1)(1)
  assert not np.array_equal(sampler.users_for_round(1), sampler.users_for_round(6))
  assert sampler(2)[0].endswith(':2')


# --- A DP learning process (TFF) ----------------------------------------------


def _client_data(user: int) -> tf.data.Dataset:
  rng = np.random.default_rng(user)
  n = 6
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=collections.OrderedDict(user=np.full(n, user, np.int32),
                                item=rng.integers(0, 15, n).astype(np.int32)),
      y=rng.integers(1, 6, n).astype(np.float32))).batch(3)


@pytest.mark.parametrize('algorithm, embedding', [('fedavg', UE.SHARED), ('fedrecon', UE.LOCAL)])
def test_dp_process_moves_the_global_model_by_at_most_the_clip(tff_context, algorithm, embedding):
  del tff_context  # tests/conftest.py: our orphan-safe TFF context.
  spec = model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', embedding_dim=4),
      num_users=20, num_items=15, task=registry.default_task('mf'))
  clip, cpr = 0.05, 5
  setup = _prepare(DpConfig('gaussian_fixed', noise_multiplier=0.0, clip=clip),
                   clients_per_round=cpr, population=20, user_embedding=embedding)
  process = algorithms.build_process(
      algorithms.AlgorithmConfig(name=algorithm, weighting='uniform'), spec, embedding,
      setup.aggregator)
  state = process.initialize()
  before = process.get_model_weights(state).trainable
  out = process.next(state, [_client_data(u) for u in range(cpr)])
  after = process.get_model_weights(out.state).trainable
  moved = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before)))
  # Server SGD with learning rate 1 applies the mean of clipped updates.
  assert 0 < moved <= clip * (1 + 1e-5)


def test_run_federated_with_dp_logs_the_running_epsilon(tmp_path):
  """End to end: FedRecon + adaptive DP through experiment.run_federated."""
  data = synthetic.synthetic_ratings(num_users=60, num_items=20, seed=7)
  split = splits.split_by_user(data.ratings, fractions=(0.8, 0.0, 0.2))
  config = experiment.FederatedConfig(
      model=experiment.ModelConfig('mf', {'embedding_dim': 4}),
      algorithm=algorithms.AlgorithmConfig(name='fedrecon', weighting='uniform'),
      clients_per_round=8, total_rounds=3, eval_every=3, sampling='poisson')
  run = execution.ExecutionConfig(root_output_dir=str(tmp_path), progress_bar=False)
  dp = DpConfig('gaussian_adaptive', noise_multiplier=0.3, clip=0.5)
  config, setup = dp_flags.prepare_dp_for_run(dp, config, split)
  result = experiment.run_federated(
      config, run, split=split, model_aggregator=setup.aggregator,
      extra_metrics_fn=setup.extra_metrics_fn, total_rounds=setup.total_rounds,
      hparams_extra={'dp': setup.report()})
  assert math.isfinite(result.test_metrics['rmse'])
  with open(tmp_path / run.experiment_name / 'metrics.csv') as f:
    rows = [r for r in csv.DictReader(f) if r.get('dp/epsilon')]
  assert [int(r['round_num']) for r in rows] == [1, 2, 3]
  for r in rows:
    plan = accounting.DpPlan(0.3, 8, setup.population, int(r['round_num']), setup.delta)
    assert float(r['dp/epsilon']) == pytest.approx(accounting.compute_epsilon(plan), rel=1e-6)
  hparams = json.loads((tmp_path / run.experiment_name / 'hparams.json').read_text())
  assert hparams['dp']['mode'] == 'gaussian_adaptive'


@pytest.mark.parametrize('algorithm', ['fedavg', 'fedrecon'])
def test_run_federated_with_distributed_dp(tmp_path, algorithm):
  """End to end: --dp=ddp builds (a proto deeper than upb's default limit) and runs
  under the context that executes secure sums."""
  data = synthetic.synthetic_ratings(num_users=40, num_items=20, seed=3)
  split = splits.split_by_user(data.ratings, fractions=(0.8, 0.0, 0.2))
  config = experiment.FederatedConfig(
      model=experiment.ModelConfig('mf', {'embedding_dim': 4}),
      algorithm=algorithms.AlgorithmConfig(name=algorithm, weighting='uniform',
                                           row_sparse_mean=False),
      clients_per_round=8, total_rounds=2, eval_every=2, sampling='fixed_size')
  dp = DpConfig('ddp', noise_multiplier=0.3, clip=0.5)
  config, setup = dp_flags.prepare_dp_for_run(dp, config, split)
  assert setup.needs_secure_context
  run = execution.ExecutionConfig(root_output_dir=str(tmp_path), progress_bar=False,
                                  secure_intrinsics=True)
  result = experiment.run_federated(
      config, run, split=split, model_aggregator=setup.aggregator,
      extra_metrics_fn=setup.extra_metrics_fn, total_rounds=setup.total_rounds)
  assert math.isfinite(result.test_metrics['rmse'])
  with open(tmp_path / run.experiment_name / 'metrics.csv') as f:
    eps = [float(r['dp/epsilon']) for r in csv.DictReader(f) if r.get('dp/epsilon')]
  assert len(eps) == 2 and 0 < eps[0] < eps[1]


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
