"""The central pass of algorithm_speed does exactly one FedRecon client's work."""

import sys
import numpy as np
import pytest

from benchmarks import algorithm_speed
from tff_rec.data import federated
from tff_rec.data import synthetic

_SETUP = algorithm_speed.Setup(batch_size=4, embedding_dim=3, recon_epochs=2,
                               server_learning_rate=1.0, clients_per_subround=10)


@pytest.fixture(scope='module')
def ratings():
  return synthetic.synthetic_ratings(num_users=12, num_items=10, rank=2, mean_ratings_per_user=7,
                                     seed=3).ratings


@pytest.mark.parametrize('name', ['fedrecon', 'fedrecon_closed_form'])
def test_central_pass_equals_one_client_round(ratings, tff_context, tmp_path, name):
  del tff_context
  algo = algorithm_speed.BY_NAME[name]
  client = [federated.client_id(3, 1)]
  # One client, server SGD with rate 1: the new global model is that client's final model.
  runner = algorithm_speed.FederatedRunner(ratings, algo, _SETUP, str(tmp_path), clients=1)
  runner.round(client)
  federated_weights = [np.asarray(w) for w in runner.process.get_model_weights(runner.state).trainable]
  central = algorithm_speed.CentralRunner(ratings, algo, _SETUP)
  central.epoch(client)
  central_weights = [v.numpy() for v in central.model._global]  # pylint: disable=protected-access
  for a, b in zip(federated_weights, central_weights):
    np.testing.assert_allclose(a, b, atol=1e-5)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
