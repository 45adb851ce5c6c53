"""Federated SASRec: it learns, only weight deltas are aggregated, and it is one client per user."""

import sys
import numpy as np
import pytest
import tensorflow_federated as tff

from tests.training import recording_aggregator
from tests.training import sequential_test
from tff_rec import runtime
from tff_rec.training import sequential
from tff_rec.training import sequential_fedavg

_HP = dict(maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout=0.0)


@pytest.fixture(scope='module', autouse=True)
def _context():
  runtime.set_local_context()


def _config(**kw):
  args = dict(central=sequential.SequentialConfig(hparams=_HP, progress_bar=False, seed=0),
              rounds=20, clients_per_round=32, local_steps=2, client_learning_rate=0.5,
              server_learning_rate=0.01, eval_every=10)
  args.update(kw)
  return sequential_fedavg.FedSequentialConfig(**args)


def test_fedavg_learns_the_cycle():
  split = sequential_test._cyclic_split(users=128)  # pylint: disable=protected-access
  rows = []
  result = sequential_fedavg.train(_config(), split, on_eval=rows.append)
  assert [r['round'] for r in rows] == [10, 20]
  assert rows[-1]['loss'] < 1.0  # BCE of pos + neg starts near 2 * ln 2
  # Chance HR@10 among 21 candidates is about 0.48.
  assert result.test['hr@10'] > 0.9 and result.test['full_hr@10'] > 0.5
  again = sequential.evaluate(result.model, split, which='test', maxlen=8)
  assert again['hr@10'] == pytest.approx(result.test['hr@10'])


def test_only_weight_deltas_reach_the_server():
  split = sequential_test._cyclic_split(users=16)  # pylint: disable=protected-access
  config = sequential.SequentialConfig(hparams=_HP, progress_bar=False)
  recorder = recording_aggregator.RecordingMean()
  model = sequential.build_model(config, split)
  process = sequential_fedavg.build_process(
      model_fn=lambda: sequential.build_model(config, split), maxlen=8, loss='bce',
      num_negatives=1, client_learning_rate=0.5, server_optimizer='sgd', server_learning_rate=1.0,
      model_aggregator=recorder)
  [value_type] = recorder.value_types
  shapes = [tuple(t.shape) for t in value_type]
  assert shapes == [tuple(v.shape) for v in model.trainable_variables]
  assert all(t.dtype == np.float32 for t in value_type)  # no item ids, no sequences
  # The client data (the sequences) are CLIENTS-placed inputs of next only.
  data_param = process.next.type_signature.parameter[1]
  assert data_param.placement == tff.CLIENTS
  assert isinstance(data_param.member, tff.SequenceType)
  # With server SGD 1.0 and one client, the new global model is that client's trained model.
  state = process.initialize()
  sampler = sequential.TrainingSampler(split, 8, seed=0)
  before = process.get_model_weights(state)
  out = process.next(state, [sequential_fedavg.client_dataset(sampler, 3, 1)])
  after = process.get_model_weights(out.state)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(before.trainable, after.trainable)]
  assert max(moved) > 0
  assert out.metrics['client_work']['targets'] == float(min(len(split.train[3]) - 1, 8))


def test_client_dataset_is_the_users_window_with_fresh_negatives():
  split = sequential_test._cyclic_split(users=16)  # pylint: disable=protected-access
  sampler = sequential.TrainingSampler(split, 8, seed=0)
  steps = list(sequential_fedavg.client_dataset(sampler, 5, 3).as_numpy_iterator())
  assert len(steps) == 3
  for seq, pos, neg in steps:
    np.testing.assert_array_equal(seq[0], split.train[5][-9:-1][-8:])
    np.testing.assert_array_equal(pos[0], split.train[5][1:][-8:])
    assert not np.isin(neg, split.train[5]).any()
  assert any((a[2] != b[2]).any() for a, b in zip(steps, steps[1:]))


def test_config_and_population_errors():
  with pytest.raises(ValueError, match='rounds'):
    _config(rounds=0)
  with pytest.raises(ValueError, match='server_optimizer'):
    _config(server_optimizer='yogi')
  split = sequential_test._cyclic_split(users=8)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='exceeds'):
    sequential_fedavg.train(_config(clients_per_round=9), split)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
