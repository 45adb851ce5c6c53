"""--secure_aggregation (privacy/secure_rounds.py): a ddp round by protocol equals TFF's round.

The process under test is the toolkit's own DP-FedRecon with distributed DP
on synthetic ratings, composed with its client datasets exactly as
`experiment.run_federated` does.
"""

import collections
import csv
import json
import sys

import numpy as np
import pytest
import tensorflow_federated as tff

from experiments import run_setup
from privacy import dp_aggregators
from privacy import secagg
from privacy import secure_rounds
from tff_rec import runtime
from tff_rec.data import federated
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.training import algorithms
from tff_rec.training import execution
from tff_rec.training import experiment

SAConfig = secure_rounds.SecureAggregationConfig
CLIENTS = 8


@pytest.fixture(scope='module', autouse=True)
def secure_context():
  """Our local context running secure sums as plain sums (TFF's own path, for comparison)."""
  runtime.set_local_context(secure_intrinsics=True)


def _config():
  return experiment.FederatedConfig(
      model=experiment.ModelConfig('mf', {'embedding_dim': 4}),
      algorithm=algorithms.AlgorithmConfig(name='fedrecon', weighting='uniform',
                                           row_sparse_mean=False),
      clients_per_round=CLIENTS, total_rounds=2, eval_every=2, sampling='fixed_size')


@pytest.fixture(scope='module')
def split():
  data = synthetic.synthetic_ratings(num_users=40, num_items=20, seed=3)
  return splits.split_by_user(data.ratings, fractions=(0.8, 0.0, 0.2))


@pytest.fixture(scope='module')
def composed(split):
  config, setup = run_setup.prepare_dp(
      dp_aggregators.DpConfig('ddp', noise_multiplier=0.3, clip=0.5), _config(), split)
  spec = experiment.model_spec(config, split)
  user_embedding = algorithms.default_user_embedding('fedrecon', split.heldout_users)
  process = algorithms.build_process(config.algorithm, spec, user_embedding, setup.aggregator)
  data = federated.client_data(split.train, federated.ClientDatasetConfig(batch_size=8, seed=0))
  return tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)


@pytest.fixture(scope='module')
def ids(split):
  return [federated.client_id(u, 1) for u in split.train.present_users()[:CLIENTS]]


def _tff_round(wrapped, state, outputs):
  """TFF's own round from fixed client outputs: its secure-sum intrinsics (plain-sum bodies)."""
  mrf = wrapped._mrf
  work = mrf.work.type_signature.result

  @tff.federated_computation(tff.FederatedType(wrapped._state_type, tff.SERVER),
                             tff.FederatedType(work, tff.CLIENTS))
  def round_from(state, out):
    aggregate = tff.federated_aggregate(out[0], mrf.zero(), mrf.accumulate, mrf.merge,
                                        mrf.report)
    bitwidth = tff.federated_secure_sum_bitwidth(out[1], mrf.secure_sum_bitwidth())
    return tff.federated_map(mrf.update, tff.federated_zip((state, (
        aggregate, bitwidth, tff.federated_value((), tff.SERVER),
        tff.federated_value((), tff.SERVER)))))

  assert not tff.structure.flatten(work[2]) and not tff.structure.flatten(work[3])
  return tff.structure.from_container(round_from(state, outputs), recursive=True)


def _flat(tree):
  return [np.asarray(v) for v in tff.structure.flatten(
      tff.structure.from_container(tree, recursive=True))]


@pytest.mark.parametrize('mode', ['secagg', 'secagg_plus', 'he'])
def test_a_round_by_protocol_equals_tffs_round_bit_for_bit(composed, ids, mode):
  wrapped = secure_rounds.SecureRoundProcess(composed, SAConfig(mode=mode, verify=True))
  state = wrapped.initialize()
  outputs = list(wrapped._client_phase(state, ids))  # The clients' messages, fixed.
  wrapped._client_phase = lambda *_: outputs
  ours = wrapped.next(state, ids)
  theirs = _tff_round(wrapped, state, outputs)
  assert type(ours.state) is type(state)
  # The model is TFF's, bit for bit. (The rest of the state is the adaptive
  # clip's estimate, which TFF's update re-draws with fresh noise each time.)
  ours_weights = _flat(composed.get_model_weights(ours.state))
  theirs_weights = _flat(composed.get_model_weights(
      tff.types.type_to_py_container(theirs[0], wrapped._state_type)))
  assert len(ours_weights) == len(theirs_weights) == 3
  for a, b in zip(ours_weights, theirs_weights):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_flat(ours.state), _flat(theirs[0])):
    assert a.shape == b.shape and a.dtype == b.dtype
  ours_metrics = collections.OrderedDict(ours.metrics)
  extra = ours_metrics.pop(secure_rounds.METRICS_KEY)
  for a, b in zip(_flat(ours_metrics), _flat(theirs[1])):
    np.testing.assert_array_equal(a, b)
  assert extra['clients'] == CLIENTS and extra['dropped'] == 0 and extra['exact_checked'] == 1
  assert extra['upload_bytes'] > 0 and extra['bits'] > 20
  # The model moved: a real update, not the initial weights.
  before = composed.get_model_weights(state).trainable[0]
  assert not np.array_equal(composed.get_model_weights(ours.state).trainable[0], before)


def test_the_server_object_only_ever_sees_masked_vectors(composed, ids, monkeypatch):
  wrapped = secure_rounds.SecureRoundProcess(composed, SAConfig(mode='secagg'))
  state = wrapped.initialize()
  outputs = list(wrapped._client_phase(state, ids))
  wrapped._client_phase = lambda *_: outputs
  plain = [wrapped._flatten(o) for o in outputs]
  seen = {}
  original = secagg.Server.collect_masked

  def spy(self, masked):
    seen.update(masked)
    return original(self, masked)

  monkeypatch.setattr(secagg.Server, 'collect_masked', spy)
  wrapped.next(state, ids)
  assert sorted(seen) == list(range(CLIENTS))
  for u, y in seen.items():
    # Each masked value is a different number than the input (the masks are
    # 2^-bits-uniform; equal in at most a few positions by chance).
    assert np.mean(y == plain[u]) < 0.05
    assert int(y.max()) > int(plain[u].max())  # spread over Z_2^B, not the inputs' range


def test_dropped_clients_leave_the_update_count_and_metrics_together(composed, ids):
  wrapped = secure_rounds.SecureRoundProcess(
      composed, SAConfig(mode='secagg_plus', dropout=0.25, verify=True, degree=4, threshold=0.6))
  state = wrapped.initialize()
  outputs = list(wrapped._client_phase(state, ids))
  wrapped._client_phase = lambda *_: outputs
  wrapped.set_round(3)
  out = wrapped.next(state, ids)
  extra = out.metrics[secure_rounds.METRICS_KEY]
  assert extra['clients'] == 6 and extra['dropped'] == 2
  assert out.metrics['aggregator']['mean_value']['actual_num_clients'] == 6
  everyone = secure_rounds.SecureRoundProcess(composed, SAConfig(mode='secagg_plus', degree=4))
  everyone._client_phase = lambda *_: outputs
  full = everyone.next(state, ids).metrics
  assert full['aggregator']['mean_value']['actual_num_clients'] == CLIENTS
  # The clear-text aggregate (client counts, training metrics) is over the survivors too.
  assert out.metrics['aggregator']['client_updates'] == 6
  assert full['aggregator']['client_updates'] == CLIENTS
  assert out.metrics['client_work']['train']['loss'] != full['client_work']['train']['loss']


def test_below_the_threshold_the_round_stops_with_a_clear_error(composed, ids):
  wrapped = secure_rounds.SecureRoundProcess(
      composed, SAConfig(mode='secagg', threshold=1.0, dropout=0.25))
  with pytest.raises(secure_rounds.SecureRoundError, match=r'round 0.*t=8'):
    wrapped.next(wrapped.initialize(), ids)


def test_a_process_without_secure_sums_is_refused(split):
  config = _config()
  spec = experiment.model_spec(config, split)
  user_embedding = algorithms.default_user_embedding('fedrecon', split.heldout_users)
  process = algorithms.build_process(config.algorithm, spec, user_embedding, None)
  data = federated.client_data(split.train, federated.ClientDatasetConfig(batch_size=8, seed=0))
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)
  with pytest.raises(secure_rounds.SecureRoundError, match='protect nothing'):
    secure_rounds.SecureRoundProcess(composed, SAConfig(mode='secagg'))


def test_config_checks_name_the_flag():
  for kwargs, flag in ((dict(mode='paillier'), '--secure_aggregation'),
                       (dict(mode='secagg', threshold=0.5), '--secagg_threshold'),
                       (dict(mode='secagg', dropout=1.0), '--secagg_dropout'),
                       (dict(mode='secagg_plus', degree=3), '--secagg_degree')):
    with pytest.raises(ValueError, match=flag):
      SAConfig(**kwargs)
  assert secagg.harary_degree(943) == 30 and secagg.harary_degree(8) == 6
  assert secagg.harary_degree(100, 4) == 4


def test_prepare_run_refuses_a_protocol_without_distributed_dp(split):
  with pytest.raises(run_setup.RunSetupError, match='--secure_aggregation=secagg: needs --dp=ddp'):
    run_setup.prepare_run(_config(), execution.ExecutionConfig(), split,
                          dp_config=dp_aggregators.DpConfig('gaussian_fixed', noise_multiplier=1,
                                                            clip=0.5),
                          secure_aggregation=SAConfig(mode='secagg'))


def test_a_run_trains_and_resumes_under_secagg_plus(split, tmp_path):
  """End to end through run_setup.prepare_run and run_federated, then resumed for a round."""
  dp = dp_aggregators.DpConfig('ddp', noise_multiplier=0.3, clip=0.5)
  run = execution.ExecutionConfig(root_output_dir=str(tmp_path), progress_bar=False,
                                  allow_config_change=True)
  sa = SAConfig(mode='secagg_plus', dropout=0.125)
  prepared = run_setup.prepare_run(_config(), run, split, dp_config=dp, secure_aggregation=sa)
  result = experiment.run_federated(prepared.config, prepared.execution, **prepared.run_kwargs)
  assert np.isfinite(result.test_metrics['rmse'])
  run_dir = tmp_path / run.experiment_name
  hparams = json.loads((run_dir / 'hparams.json').read_text())
  assert hparams['secure_aggregation'] == {'mode': 'secagg_plus', 'dropout': 0.125, 'seed': 0,
                                           'verify': False, 'threshold': 2 / 3, 'degree': None}
  config3 = experiment.FederatedConfig(**{**_config().__dict__, 'total_rounds': 3})
  prepared = run_setup.prepare_run(config3, run, split, dp_config=dp, secure_aggregation=sa)
  experiment.run_federated(prepared.config, prepared.execution, **prepared.run_kwargs)
  with open(run_dir / 'metrics.csv') as f:
    rows = [r for r in csv.DictReader(f) if r.get('secure_aggregation/clients')]
  assert [int(r['round_num']) for r in rows] == [1, 2, 3]
  assert all(int(r['secure_aggregation/clients']) == CLIENTS - 1 for r in rows)
  assert all(float(r['dp/epsilon']) > 0 for r in rows)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
