"""The fast FedRecon equals TFF's; closed-form reconstruction solves the gradient path's objective."""

import sys
import collections
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import federated
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import evaluation
from tff_rec.training import fed_recon
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@pytest.fixture(scope='module')
def split():
  r = synthetic.synthetic_ratings(num_users=40, num_items=15, rank=2, noise_std=0.3,
                                  mean_ratings_per_user=12, seed=3).ratings
  return splits.split_random(r, fractions=(0.85, 0.0, 0.15), seed=0)


def _spec(split, name='mf', **hparams):
  if name == 'mf':
    hparams.setdefault('global_mean', split.train.global_mean())
    hparams.setdefault('embedding_dim', 3)
    hparams.setdefault('init_stddev', 0.3)
    hparams.setdefault('l2', 0.05)
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, name, **hparams),
      num_users=split.train.num_users, num_items=split.train.num_items,
      task=registry.default_task(name, **hparams), seed=0, name=name)


def _train(split, config, rounds=3, clients=25, **implementation):
  spec = _spec(split)
  process = algorithms.build_process(config, spec, model_fns.UserEmbedding.LOCAL, **implementation)
  data = federated.client_data(split.train, federated.ClientDatasetConfig(batch_size=4))
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)
  state = composed.initialize()
  metrics = []
  for r in range(rounds):
    ids = [federated.client_id(u, r) for u in split.train.present_users()[:clients]]
    out = composed.next(state, ids)
    state = out.state
    metrics.append(dict(out.metrics['client_work']['train']))
  weights = process.get_model_weights(state)
  return [np.asarray(w) for w in weights.trainable], metrics


def _config(**kwargs):
  kwargs.setdefault('reconstruction_optimizer', optimizers.OptimizerConfig('sgd', 0.3))
  return algorithms.AlgorithmConfig(
      name='fedrecon', client_optimizer=optimizers.OptimizerConfig('sgd', 0.2),
      server_optimizer=optimizers.OptimizerConfig('adam', 0.05), **kwargs)


EQUIVALENCE_CASES = {
    'default': dict(recon_epochs=2),
    'split_dataset': dict(split_dataset=True, recon_epochs=3),
    'steps_max': dict(recon_epochs=3, recon_steps_max=4, post_recon_steps_max=2),
    'uniform_momentum': dict(weighting='uniform', recon_epochs=2,
                             reconstruction_optimizer=optimizers.OptimizerConfig('momentum', 0.1)),
    'reduce_loop': dict(recon_epochs=2),
}
LOOPS = {'reduce_loop': 'reduce'}


@pytest.mark.parametrize('case', sorted(EQUIVALENCE_CASES))
def test_same_model_and_metrics_as_tff_build_fed_recon(split, tff_context, case):
  del tff_context
  kwargs = EQUIVALENCE_CASES[case]
  ref_weights, ref_metrics = _train(split, _config(**kwargs), fedrecon_implementation='tff')
  weights, metrics = _train(split, _config(**kwargs), fedrecon_implementation='fast',
                            loop_implementation=LOOPS.get(case, 'iterator'))
  for a, b in zip(ref_weights, weights):
    np.testing.assert_allclose(a, b, atol=2e-5)
  for a, b in zip(ref_metrics, metrics):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)


@pytest.mark.parametrize('heldout', [False, True])
def test_same_evaluation_as_tff_build_fed_recon_eval(tff_context, heldout):
  del tff_context
  r = synthetic.synthetic_ratings(num_users=30, num_items=15, rank=2, mean_ratings_per_user=10,
                                  seed=4).ratings
  split = (splits.split_by_user(r, fractions=(0.7, 0.0, 0.3), seed=0) if heldout
           else splits.split_random(r, fractions=(0.8, 0.0, 0.2), seed=0))
  spec = _spec(split)
  weights, _ = _train(split, _config(recon_epochs=2), rounds=1)
  results = {}
  for implementation in ('tff', 'fast'):
    ev = evaluation.FederatedEvaluator(
        spec, model_fns.UserEmbedding.LOCAL, None if heldout else split.train, split.test,
        batch_size=3, heldout_users=heldout, implementation=implementation,
        recon=evaluation.ReconEvalConfig(optimizers.OptimizerConfig('sgd', 0.2), recon_epochs=3,
                                         recon_steps_max=7))
    model_weights = tff.learning.models.ModelWeights(trainable=weights, non_trainable=[])
    results[implementation] = ev(model_weights)
  assert results['tff'].keys() == results['fast'].keys()
  for key in results['tff']:
    np.testing.assert_allclose(results['tff'][key], results['fast'][key], rtol=2e-5, err_msg=key)


# --- closed-form reconstruction ---------------------------------------------


def _one_user(seed=0, n=11, num_items=20):
  rng = np.random.default_rng(seed)
  items = rng.choice(num_items, size=n, replace=False).astype(np.int32)
  labels = rng.integers(1, 6, size=n).astype(np.float32)
  return items, labels


def _recon_model(name, num_items=20, **hparams):
  spec = model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, name, **hparams),
      num_users=1, num_items=num_items, task=registry.default_task(name, **hparams), seed=1,
      name=name)
  model = model_fns.recon_model_fn(spec)()
  # Non-trivial global part: random item rows and biases.
  rng = np.random.default_rng(7)
  for v in tff.learning.models.ReconstructionModel.get_global_variables(model).trainable:
    v.assign(rng.normal(0.0, 0.5, size=v.shape).astype(np.float32) + (3.5 if 'global' in v.name else 0))
  return spec, model


def _dataset(items, labels, batch_size):
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=collections.OrderedDict(user=tf.zeros_like(items), item=items), y=labels)).batch(batch_size)


def _local(model):
  return [v.numpy().copy() for v in
          tff.learning.models.ReconstructionModel.get_local_variables(model).trainable]


def _reconstruct(model, dataset, reconstruction, ridge=None, lr=0.1, epochs=1):
  loss = tf.keras.losses.MeanSquaredError()
  loop = tff.learning.LoopImplementation.DATASET_ITERATOR

  @tf.function
  def run():
    batches = fed_recon._read_batches(dataset, loop)  # pylint: disable=protected-access
    if reconstruction == 'closed_form':
      fed_recon.closed_form_reconstruct(model, ridge, batches, tf.range(batches.count))
    else:
      indices = tf.tile(tf.range(batches.count), [epochs])
      optimizer = tff.learning.optimizers.build_sgdm(learning_rate=lr)
      fed_recon.gradient_reconstruct(model, loss, optimizer, batches, indices)

  run()
  return _local(model)


def _objective_gradient(model, dataset):
  """Sum over batches of the gradient of (batch MSE + lookup L2) w.r.t. the local variables."""
  local = tff.learning.models.ReconstructionModel.get_local_variables(model).trainable
  loss = tf.keras.losses.MeanSquaredError()
  total = [np.zeros(v.shape, np.float32) for v in local]
  for batch in dataset:
    with tf.GradientTape() as tape:
      out = model.forward_pass(batch, training=True)
      value = loss(out.labels, out.predictions)
    for k, g in enumerate(tape.gradient(value, local)):
      total[k] += tf.convert_to_tensor(g).numpy()
  return total


MODELS = {
    'mf': dict(embedding_dim=4, l2=0.2),
    'mf_no_bias': dict(embedding_dim=3, l2=0.05, use_biases=False),
    'gmf_rating': dict(factors=4, l2=0.1, task='rating', global_mean=3.5),
}


@pytest.mark.parametrize('model_key', sorted(MODELS))
@pytest.mark.parametrize('batch_size', [4, 32])
def test_closed_form_is_a_stationary_point_of_the_objective(model_key, batch_size):
  name = model_key.split('_')[0]
  spec, model = _recon_model(name, **MODELS[model_key])
  items, labels = _one_user()
  ds = _dataset(items, labels, batch_size)
  _reconstruct(model, ds, 'closed_form', ridge=model_fns.closed_form_ridge(spec))
  for g in _objective_gradient(model, ds):
    np.testing.assert_allclose(g, 0.0, atol=2e-5)


@pytest.mark.parametrize('model_key', sorted(MODELS))
def test_closed_form_equals_gradient_steps_run_to_convergence(model_key):
  name = model_key.split('_')[0]
  items, labels = _one_user(seed=2)
  spec, model = _recon_model(name, **MODELS[model_key])
  ridge = model_fns.closed_form_ridge(spec)
  # One batch: SGD is gradient descent on the objective and converges to its minimizer.
  exact = _reconstruct(model, _dataset(items, labels, 64), 'closed_form', ridge=ridge)
  _, model = _recon_model(name, **MODELS[model_key])
  steps = _reconstruct(model, _dataset(items, labels, 64), 'gradient', lr=0.05, epochs=4000)
  for a, b in zip(exact, steps):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # Several batches: cyclic SGD with a small step ends within O(lr) of the minimizer.
  exact = _reconstruct(model, _dataset(items, labels, 4), 'closed_form', ridge=ridge)
  _, model = _recon_model(name, **MODELS[model_key])
  steps = _reconstruct(model, _dataset(items, labels, 4), 'gradient', lr=0.002, epochs=6000)
  for a, b in zip(exact, steps):
    np.testing.assert_allclose(a, b, atol=3e-3)


def test_closed_form_without_ridge_is_the_minimum_norm_solution():
  spec, model = _recon_model('mf', embedding_dim=6, l2=0.0)
  items, labels = _one_user(n=3)  # 3 ratings, 7 unknowns: underdetermined.
  ds = _dataset(items, labels, 8)
  theta = np.concatenate([a.ravel() for a in
                          _reconstruct(model, ds, 'closed_form', ridge=model_fns.closed_form_ridge(spec))])
  for g in _objective_gradient(model, ds):
    np.testing.assert_allclose(g, 0.0, atol=1e-4)
  # Minimum norm: theta lies in the row space of the design matrix.
  item_rows = model.global_trainable_variables[0].numpy()[items]
  design = np.concatenate([item_rows, np.ones((3, 1))], axis=1)
  projection = design.T @ np.linalg.pinv(design.T)
  np.testing.assert_allclose(projection @ theta, theta, atol=1e-4)


@pytest.mark.parametrize('name,hparams,reason', [
    ('neumf', {}, 'not affine'),
    ('mlp', {}, 'not affine'),
    ('two_tower', {}, 'not affine'),
    ('gmf', {}, "task is 'implicit'"),
    ('neumf', {'task': 'rating'}, 'not affine'),
])
def test_closed_form_refuses_models_where_it_does_not_apply(name, hparams, reason):
  spec = model_fns.ModelSpec(builder=functools.partial(registry.build_model, name, **hparams),
                             num_users=5, num_items=7, task=registry.default_task(name, **hparams),
                             name=name)
  with pytest.raises(ValueError, match=f"model '{name}'.*{reason}"):
    model_fns.closed_form_ridge(spec)


def test_closed_form_training_learns(split, tff_context):
  del tff_context
  _, metrics = _train(split, _config(reconstruction='closed_form'), rounds=4)
  assert metrics[-1]['loss'] < 0.8 * metrics[0]['loss']


def test_config_refusals(split):
  with pytest.raises(ValueError, match='gradient reconstruction only'):
    algorithms.build_process(_config(reconstruction='closed_form'), _spec(split),
                             model_fns.UserEmbedding.LOCAL, fedrecon_implementation='tff')
  with pytest.raises(ValueError, match='for fedrecon'):
    algorithms.AlgorithmConfig(name='fedavg', reconstruction='closed_form')
  with pytest.raises(ValueError, match='unknown reconstruction'):
    _config(reconstruction='exact')
  with pytest.raises(ValueError, match='fedrecon_implementation'):
    algorithms.build_process(_config(), _spec(split), model_fns.UserEmbedding.LOCAL,
                             fedrecon_implementation='slow')


def test_data_split_indices_follow_tff_split_rules():
  def idx(split, n, query=None):
    query = tf.zeros([n], tf.bool) if query is None else tf.constant(query)
    recon, post = split.indices(tf.constant(n), query)
    return recon.numpy().tolist(), post.numpy().tolist()

  assert idx(fed_recon.DataSplit(recon_epochs=2), 3) == ([0, 1, 2, 0, 1, 2], [0, 1, 2])
  assert idx(fed_recon.DataSplit(split_dataset=True, recon_epochs=2, recon_steps_max=3), 5) == (
      [0, 2, 4], [1, 3])
  assert idx(fed_recon.DataSplit(post_recon_steps_max=1), 3) == ([0, 1, 2], [0])
  assert idx(fed_recon.DataSplit(by_query_marker=True, recon_epochs=2), 4,
             [False, False, True, True]) == ([0, 1, 0, 1], [2, 3])
  assert fed_recon.DataSplit(recon_epochs=5).for_reconstruction('closed_form').recon_epochs == 1
  cut = fed_recon.DataSplit(recon_epochs=5, recon_steps_max=7)
  assert cut.for_reconstruction('closed_form') == cut
  with pytest.raises(ValueError, match='exclusive'):
    fed_recon.DataSplit(split_dataset=True, by_query_marker=True)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
