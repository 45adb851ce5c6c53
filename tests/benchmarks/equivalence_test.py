"""The benchmarked speed-ups leave results unchanged: same model, same metrics.

`before` (Dataset.reduce client loop, ratings as constants, one call per
round) against `after`-style set-ups (iterator loop, one file per user,
rounds split into subrounds) on synthetic ratings, for plain FedAvg and the
row-sparse mean.
"""

import sys
import numpy as np
import pytest

from benchmarks import federated_speed
from tff_rec import runtime
from tff_rec.data import synthetic
from tff_rec.training import execution

_SETUP = federated_speed.Setup(batch_size=4, embedding_dim=3, client_learning_rate=0.2)
_FAST = federated_speed.Variant('fast', loop_implementation='iterator', storage='files',
                                clients_per_subround=7)


@pytest.fixture(scope='module')
def ratings():
  return synthetic.synthetic_ratings(num_users=40, num_items=15, rank=2, mean_ratings_per_user=10,
                                     seed=5).ratings


@pytest.fixture(scope='module', autouse=True)
def _restore_context():
  yield
  runtime.set_local_context()  # Other tests expect a plain local context.


def _train(r, variant, row_sparse_mean, storage_dir, rounds=2):
  runner = federated_speed.FederatedRunner(r, variant, row_sparse_mean, _SETUP, storage_dir)
  metrics = []
  for round_num in range(1, rounds + 1):
    out = runner.round(federated_speed.client_ids(r, 30, 0, round_num))
    metrics.append(out['client_work']['train'])
  weights = runner.weights()
  return [np.asarray(w) for w in list(weights.trainable) + list(weights.non_trainable)], metrics


@pytest.fixture(scope='module')
def before(ratings, tmp_path_factory):
  """The reference run of `before`, per aggregator."""
  cache = {}

  def get(row_sparse_mean):
    if row_sparse_mean not in cache:
      cache[row_sparse_mean] = _train(ratings, federated_speed.BEFORE, row_sparse_mean,
                                      str(tmp_path_factory.mktemp('before')))
    return cache[row_sparse_mean]

  return get


@pytest.mark.parametrize('row_sparse_mean', [False, True])
@pytest.mark.parametrize('variant', [federated_speed.AFTER, _FAST], ids=lambda v: v.name)
def test_same_weights_and_metrics_as_before(ratings, before, tmp_path, variant, row_sparse_mean):
  ref_weights, ref_metrics = before(row_sparse_mean)
  weights, metrics = _train(ratings, variant, row_sparse_mean, str(tmp_path))
  for a, b in zip(ref_weights, weights):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(ref_metrics, metrics):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_unknown_loop_implementation_is_rejected():
  with pytest.raises(ValueError, match='loop_implementation'):
    execution.ExecutionConfig(loop_implementation='while')


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
