"""The DP aggregation processes really clip, add noise and adapt (run in TFF)."""

import sys
import numpy as np
import pytest
import tensorflow_federated as tff

from privacy import dp_aggregators
from tff_rec import runtime

DpConfig = dp_aggregators.DpConfig
DIM = 2000


@pytest.fixture(scope='module', autouse=True)
def secure_context():
  """Our local context, also running secure sums (for 'ddp').

  It replaces the session context of tests/conftest.py (whose worker it
  stops) and stays installed for later tests: it runs every computation the
  plain one does. Workers are stopped at exit by tff_rec.runtime.
  """
  runtime.set_local_context(secure_intrinsics=True)


def _run(config, clients_per_round, rounds_values, restart_rounds=None, dim=DIM):
  """Runs the aggregation process; returns [(result, measurements)] per round."""
  factory = dp_aggregators.build_aggregator(config, clients_per_round, restart_rounds)
  process = factory.create(tff.TensorType(np.float32, [dim]))
  state = process.initialize()
  outputs = []
  for values in rounds_values:
    out = process.next(state, [np.asarray(v, np.float32) for v in values])
    state = out.state
    outputs.append((np.asarray(out.result), out.measurements))
  return outputs


def _vector(norm, dim=DIM, seed=0):
  v = np.random.default_rng(seed).normal(size=dim)
  return v / np.linalg.norm(v) * norm


def test_noise_variance_grows_with_noise_multiplier_as_expected():
  clip, cpr = 1.0, 10
  values = [_vector(0.5, seed=k) for k in range(cpr)]  # All below the clip.
  mean = np.mean(values, axis=0)
  variances = []
  for nm in (0.5, 1.0, 2.0):
    (result, _), = _run(DpConfig('gaussian_fixed', noise_multiplier=nm, clip=clip), cpr, [values])
    var = float(np.var(result - mean))
    expected = (nm * clip / cpr) ** 2
    assert var == pytest.approx(expected, rel=0.15), (nm, var, expected)
    variances.append(var)
  assert variances[0] < variances[1] < variances[2]


def test_no_noise_without_noise_multiplier():
  values = [_vector(0.5, seed=k) for k in range(4)]
  (result, _), = _run(DpConfig('gaussian_fixed', noise_multiplier=0.0, clip=1.0), 4, [values])
  np.testing.assert_allclose(result, np.mean(values, axis=0), atol=1e-6)


@pytest.mark.parametrize('mode', ['gaussian_fixed', 'tree'])
def test_clipping_bounds_one_users_contribution(mode):
  clip, cpr = 0.5, 10
  others = [_vector(0.1, seed=k) for k in range(cpr - 1)]
  huge = _vector(1e6, seed=99)
  config = DpConfig(mode, noise_multiplier=0.0, clip=clip)
  (with_huge, _), = _run(config, cpr, [others + [huge]], restart_rounds=1)
  (with_zero, _), = _run(config, cpr, [others + [np.zeros(DIM)]], restart_rounds=1)
  moved = np.linalg.norm(with_huge - with_zero)
  assert moved <= clip / cpr * (1 + 1e-4)
  assert moved >= clip / cpr * (1 - 1e-4)  # Clipped, not dropped.
  # Small updates pass unclipped and are divided by clients_per_round.
  np.testing.assert_allclose(with_zero, np.sum(others, axis=0) / cpr, atol=1e-6)


def _clips(outputs):
  return [float(m['dp_query_metrics']['clip']) for _, m in outputs]


def test_adaptive_clip_grows_when_updates_are_clipped():
  cpr = 10
  values = [_vector(10.0, dim=16, seed=k) for k in range(cpr)]  # All above the clip.
  config = DpConfig('gaussian_adaptive', noise_multiplier=0.0, clip=0.1,
                    target_unclipped_quantile=0.5, clip_learning_rate=0.2)
  clips = _clips(_run(config, cpr, [values] * 3, dim=16))
  assert clips[0] > 0.1 and clips[1] > clips[0] and clips[2] > clips[1]
  # Geometric update: every update unclipped fraction 0 -> factor exp(0.2 * 0.5).
  assert clips[2] == pytest.approx(0.1 * np.exp(0.3), rel=1e-4)


def test_adaptive_clip_shrinks_when_nothing_is_clipped():
  cpr = 10
  values = [_vector(1e-3, dim=16, seed=k) for k in range(cpr)]
  config = DpConfig('gaussian_adaptive', noise_multiplier=0.0, clip=1.0)
  clips = _clips(_run(config, cpr, [values] * 3, dim=16))
  assert 1.0 > clips[0] > clips[1] > clips[2]


def test_adaptive_clip_with_noise_moves_in_the_right_direction():
  cpr = 40
  values = [_vector(10.0, dim=16, seed=k) for k in range(cpr)]
  config = DpConfig('gaussian_adaptive', noise_multiplier=1.0, clip=0.1)
  clips = _clips(_run(config, cpr, [values] * 4, dim=16))
  assert clips[-1] > 0.1 * np.exp(0.2)


def test_tree_runs_several_rounds_and_restarts():
  cpr = 5
  rounds = [[_vector(0.2, dim=64, seed=10 * r + k) for k in range(cpr)] for r in range(5)]
  # Without noise the residual tree query releases exactly each round's mean.
  exact = _run(DpConfig('tree', noise_multiplier=0.0, clip=1.0), cpr, rounds, restart_rounds=2, dim=64)
  for (result, _), values in zip(exact, rounds):
    np.testing.assert_allclose(result, np.mean(values, axis=0), atol=1e-5)
  noisy = _run(DpConfig('tree', noise_multiplier=1.0, clip=1.0), cpr, rounds, restart_rounds=2, dim=64)
  assert all(np.all(np.isfinite(r)) for r, _ in noisy)
  assert all(not np.allclose(r, e) for (r, _), (e, _) in zip(noisy, exact))


def test_tree_adaptive_adopts_the_clip_at_restarts():
  cpr = 5
  values = [_vector(10.0, dim=16, seed=k) for k in range(cpr)]
  config = DpConfig('tree_adaptive', noise_multiplier=0.0, clip=0.1)
  outputs = _run(config, cpr, [values] * 4, restart_rounds=2, dim=16)
  current = [float(m['dp_query_metrics']['current_clip']) for _, m in outputs]
  assert current[0] == pytest.approx(0.1)  # Fixed within a tree ...
  assert current[1] > 0.1  # ... updated at the restart after round 2.
  assert current[2] == pytest.approx(current[1])
  assert current[3] > current[2]


def test_ddp_runs_under_the_secure_context():
  cpr = 5
  values = [_vector(0.05, dim=64, seed=k) for k in range(cpr)]
  config = DpConfig('ddp', noise_multiplier=0.1, clip=0.1, ddp_bits=16)
  outputs = _run(config, cpr, [values] * 2, dim=64)
  mean = np.mean(values, axis=0)
  for result, measurements in outputs:
    assert np.all(np.isfinite(result))
    # Noise std per coordinate ~ 0.1 * clip / cpr = 0.002 (plus rounding).
    assert np.max(np.abs(result - mean)) < 0.02
    assert int(measurements['mean_value']['actual_num_clients']) == cpr


def test_zeroing_drops_a_corrupt_update():
  cpr = 4
  others = [_vector(0.1, dim=16, seed=k) for k in range(cpr - 1)]
  config = DpConfig('gaussian_fixed', noise_multiplier=0.0, clip=1.0, zeroing=True)
  (result, measurements), = _run(config, cpr, [others + [_vector(1e6, dim=16)]], dim=16)
  np.testing.assert_allclose(result, np.sum(others, axis=0) / cpr, atol=1e-6)
  assert int(measurements['zeroed_count']) == 1


def test_adaptive_noise_multiplier_too_large_is_refused():
  with pytest.raises(ValueError, match='clipped_count_stddev'):
    dp_aggregators.build_aggregator(DpConfig('gaussian_adaptive', noise_multiplier=2.0), 10)


def test_value_noise_multiplier_pays_for_the_clipped_count():
  config = DpConfig('gaussian_adaptive', noise_multiplier=1.0)
  value_nm = dp_aggregators.value_noise_multiplier(config, 100)
  count_nm = 2 * dp_aggregators.clipped_count_stddev(config, 100)
  assert value_nm > 1.0
  assert value_nm ** -2 + count_nm ** -2 == pytest.approx(1.0)


@pytest.mark.parametrize('kwargs, field', [
    (dict(mode='laplace'), 'mode'),
    (dict(mode='gaussian_fixed', noise_multiplier=1.0), 'clip'),
    (dict(mode='gaussian_fixed', clip=1.0), 'noise_multiplier or target_epsilon'),
    (dict(mode='gaussian_fixed', noise_multiplier=-1.0, clip=1.0), 'noise_multiplier'),
    (dict(mode='gaussian_fixed', noise_multiplier=1.0, clip=1.0, delta=2.0), 'delta'),
    (dict(mode='gaussian_fixed', noise_multiplier=1.0, clip=1.0, restart_rounds=5), 'restart_rounds'),
    (dict(mode='ddp', noise_multiplier=1.0, ddp_bits=30), 'ddp_bits'),
    (dict(mode='tree', noise_multiplier=1.0, clip=1.0, on_budget='warn'), 'on_budget'),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    DpConfig(**kwargs)


def test_adaptive_modes_default_to_tffs_initial_clip():
  assert DpConfig('gaussian_adaptive', noise_multiplier=1.0).initial_clip == 0.1
  assert dp_aggregators.build_aggregator(DpConfig(), 10) is None


def test_the_secure_context_keeps_python_containers_of_results():
  """Lowering secure sums rebuilt the computation without its Python containers,
  so a `LearningProcessOutput` came back as an OrderedDict (ddp runs with an
  explicit-feedback evaluator crashed in the binary, whose rounds are split
  into subrounds)."""
  output_type = tff.learning.templates.LearningProcessOutput

  @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
  def comp(x):
    total = tff.federated_secure_sum_bitwidth(x, 8)
    return output_type(state=total, metrics=tff.federated_sum(x))

  for clients_per_subround in (None, 2):
    runtime.set_local_context(secure_intrinsics=True, clients_per_subround=clients_per_subround)
    try:
      out = comp([1, 2, 3])
    finally:
      runtime.set_local_context(secure_intrinsics=True)
    assert isinstance(out, output_type) and out.state == 6 and out.metrics == 6


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
