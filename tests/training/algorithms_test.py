"""Each federated algorithm lowers the loss on synthetic low-rank ratings."""

import sys
import functools

import numpy as np
import pytest
import tensorflow_federated as tff

from tff_rec.data import federated
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import evaluation
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@pytest.fixture(scope='module')
def split():
  r = synthetic.synthetic_ratings(num_users=60, num_items=20, rank=2, noise_std=0.2,
                                  mean_ratings_per_user=16, seed=2).ratings
  return splits.split_random(r, fractions=(0.9, 0.0, 0.1), seed=0)


def _spec(split, name='mf', **hparams):
  if name == 'mf':
    hparams.setdefault('global_mean', split.train.global_mean())
    hparams.setdefault('embedding_dim', 2)
    hparams.setdefault('init_stddev', 0.3)
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, name, **hparams),
      num_users=split.train.num_users, num_items=split.train.num_items,
      task=registry.default_task(name), seed=0)


def _losses(process, data, ids, rounds):
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)
  state = composed.initialize()
  losses = []
  for r in range(rounds):
    out = composed.next(state, [f'{c}:{r}' for c in ids])
    state = out.state
    losses.append(float(out.metrics['client_work']['train']['loss']))
  return losses, state


CASES = [
    ('fedavg', 'num_examples', model_fns.UserEmbedding.TABLE),
    ('fedavg', 'uniform', model_fns.UserEmbedding.TABLE),
    ('fedprox', 'num_examples', model_fns.UserEmbedding.TABLE),
    ('fedavg', 'uniform', model_fns.UserEmbedding.SHARED),
    ('fedrecon', 'num_examples', model_fns.UserEmbedding.LOCAL),
    ('fedrecon', 'uniform', model_fns.UserEmbedding.LOCAL),
]


@pytest.mark.parametrize('name,weighting,user_embedding', CASES)
def test_loss_drops(split, tff_context, name, weighting, user_embedding):
  del tff_context
  config = algorithms.AlgorithmConfig(
      name=name, weighting=weighting,
      client_optimizer=optimizers.OptimizerConfig('sgd', 0.2),
      server_optimizer=optimizers.OptimizerConfig('sgd', 1.0),
      reconstruction_optimizer=optimizers.OptimizerConfig('sgd', 0.2),
      proximal_strength=0.01)
  spec = _spec(split)
  process = algorithms.build_process(config, spec, user_embedding)
  data = federated.client_data(split.train, federated.ClientDatasetConfig(batch_size=8, num_epochs=2))
  evaluator = evaluation.FederatedEvaluator(
      spec, user_embedding, support=split.train, query=split.test, batch_size=8,
      recon=evaluation.ReconEvalConfig(optimizers.OptimizerConfig('sgd', 0.2), recon_epochs=2))
  before = evaluator(process.get_model_weights(process.initialize()))['loss']
  losses, state = _losses(process, data, data.client_ids, rounds=8)
  after = evaluator(process.get_model_weights(state))['loss']
  assert np.all(np.isfinite(losses))
  # The training loss falls, and held-out ratings of the training users are
  # predicted better. A user table learns fastest; one shared user row
  # cannot personalize; FedRecon's loss is measured after each round's
  # reconstruction, so it starts low.
  if user_embedding == model_fns.UserEmbedding.TABLE:
    assert losses[-1] < 0.6 * losses[0], losses
    assert after < 0.9 * before, (before, after)
  else:
    assert losses[-1] < 0.95 * losses[0], losses
    assert after < before - 0.005, (before, after)


def test_row_sparse_mean_is_used_for_user_tables(split):
  spec = _spec(split)
  mask = model_fns.embedding_table_mask(spec, model_fns.UserEmbedding.TABLE)
  names = model_fns.trainable_variable_names(spec, model_fns.UserEmbedding.TABLE)
  assert dict(zip(names, mask)) == {
      'user_embedding/embeddings:0': True, 'item_embedding/embeddings:0': True,
      'user_bias/embeddings:0': True, 'item_bias/embeddings:0': True, 'global_bias/bias:0': False}
  # With one shared user row, the user parameters are dense.
  shared = dict(zip(model_fns.trainable_variable_names(spec, model_fns.UserEmbedding.SHARED),
                    model_fns.embedding_table_mask(spec, model_fns.UserEmbedding.SHARED)))
  assert shared['user_embedding/embeddings:0'] is False


def test_fedrecon_never_aggregates_user_embeddings(split):
  spec = _spec(split)
  process = algorithms.build_process(algorithms.AlgorithmConfig('fedrecon'), spec,
                                     model_fns.UserEmbedding.LOCAL)
  weights_type = process.get_model_weights.type_signature.result
  shapes = [tuple(t.shape) for t in tff.structure.flatten(weights_type)]
  # Global: item table, item bias, global bias. No [1, dim] user row.
  assert (1, 2) not in shapes and (split.train.num_users, 2) not in shapes
  assert (split.train.num_items, 2) in shapes


@pytest.mark.parametrize('name,user_embedding,match', [
    ('fedrecon', model_fns.UserEmbedding.TABLE, 'local user embeddings'),
    ('fedavg', model_fns.UserEmbedding.LOCAL, 'use fedrecon'),
])
def test_invalid_combinations(split, name, user_embedding, match):
  with pytest.raises(ValueError, match=match):
    algorithms.build_process(algorithms.AlgorithmConfig(name), _spec(split), user_embedding)


def test_config_validation():
  with pytest.raises(ValueError, match='unknown algorithm'):
    algorithms.AlgorithmConfig('fedsgd')
  with pytest.raises(ValueError, match='unknown weighting'):
    algorithms.AlgorithmConfig('fedavg', weighting='bogus')
  with pytest.raises(ValueError, match='proximal_strength'):
    algorithms.AlgorithmConfig('fedprox', proximal_strength=0.0)


def test_default_user_embedding():
  assert algorithms.default_user_embedding('fedrecon', False) == model_fns.UserEmbedding.LOCAL
  assert algorithms.default_user_embedding('fedavg', False) == model_fns.UserEmbedding.TABLE
  assert algorithms.default_user_embedding('fedprox', True) == model_fns.UserEmbedding.SHARED


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
