"""local_recon: the vectorized reconstruction equals TFF's per-client one."""

import sys
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import splits
from tff_rec.data import synthetic
from experiments.tables import common
from tff_rec.models import predictions
from tff_rec.training import local_recon
from tff_rec.training import data_setup
from tff_rec.training import evaluation
from tff_rec.training import experiment
from tff_rec.training import model_fns
from tff_rec.training import optimizers


def _split():
  return data_setup.load_split(data_setup.DataConfig(
      dataset='synthetic', split='by_user', test_fraction=0.3, seed=1))


def _spec(split, model='mf', **hparams):
  cfg = experiment.FederatedConfig(model=experiment.ModelConfig(model, hparams))
  return experiment.model_spec(cfg, split)


def _random_global(spec, seed=0):
  rec = spec.build(model_fns.UserEmbedding.LOCAL)
  rng = np.random.default_rng(seed)
  for v in rec.global_variables:
    offset = 3.0 if 'global_bias' in v.name else 0.0
    v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32) + offset)
  return rec


@pytest.mark.parametrize('l2,epochs,steps_max', [(0.0, 1, None), (0.1, 3, 4)])
def test_matches_tff_reconstruction_evaluation(tff_context, l2, epochs, steps_max):
  split = _split()
  spec = _spec(split, embedding_dim=4, l2=l2, init_stddev=0.3)
  rec = _random_global(spec)
  recon = evaluation.ReconEvalConfig(optimizers.OptimizerConfig('sgd', 0.3), recon_epochs=epochs,
                                     recon_steps_max=steps_max, post_recon_steps_max=steps_max)
  evaluator = evaluation.FederatedEvaluator(spec, model_fns.UserEmbedding.LOCAL, None, split.test,
                                            batch_size=3, recon=recon, heldout_users=True)
  expected = evaluator(common.global_weights(spec, rec.keras_model))

  support, query = local_recon.support_query_split(split.test, 3, steps_max)
  rows = local_recon.rating_support_rows(support, 3, epochs, steps_max)
  model = local_recon.reconstruct(spec, rec.keras_model, rows, recon.optimizer)
  got = predictions.rating_metrics(predictions.predict(model, query.users, query.items),
                                   query.ratings)
  for k in ('rmse', 'mae', 'rating_accuracy'):
    assert got[k] == pytest.approx(expected[k], abs=1e-5), k


def test_support_and_query_alternate_batches():
  split = _split()
  support, query = local_recon.support_query_split(split.test, 2)
  assert support.num_ratings + query.num_ratings == split.test.num_ratings
  s = split.test.sorted_by_user()
  user = s.users[0]
  mine = s.select(s.users == user)
  expected_support = [i for k, i in enumerate(mine.items) if (k // 2) % 2 == 0]
  assert support.select(support.users == user).items.tolist() == expected_support
  _, capped = local_recon.support_query_split(split.test, 2, post_recon_steps_max=1)
  assert np.all(np.bincount(capped.users) <= 2)


def test_schedule_repeats_epochs_and_cuts_steps():
  split = _split()
  support, _ = local_recon.support_query_split(split.test, 3)
  one = local_recon.rating_support_rows(support, 3, 1)
  two = local_recon.rating_support_rows(support, 3, 2)
  assert two.users.size == 2 * one.users.size
  cut = local_recon.rating_support_rows(support, 3, 2, recon_steps_max=2)
  assert cut.num_steps == 2 and np.all(cut.steps < 2)
  assert np.all(np.diff(cut.steps) >= 0)


def test_one_implicit_step_is_per_user_sgd():
  split = common.first_users_split(_ncf_like(), 10)
  spec = _spec(split, 'gmf', factors=4)
  rec = _random_global(spec)
  rows = local_recon.implicit_support_rows(split.train, 2, batch_size=4, recon_steps_max=1, seed=3)
  assert set(np.unique(rows.labels).tolist()) == {0.0, 1.0}
  model = local_recon.reconstruct(spec, rec.keras_model, rows, optimizers.OptimizerConfig('sgd', 0.5))
  user = int(rows.users[0])
  sel = rows.users == user
  personal = spec.build(model_fns.UserEmbedding.LOCAL)
  for layer in rec.global_layers:
    personal.keras_model.get_layer(layer.name).set_weights(layer.get_weights())
  var = personal.keras_model.get_layer('gmf_user_embedding').embeddings
  start = var.numpy()[0].copy()
  with tf.GradientTape() as tape:
    logits = personal.keras_model({'user': tf.constant(rows.users[sel]),
                                   'item': tf.constant(rows.items[sel])})
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.constant(rows.labels[sel]), logits=logits))
  grad = tf.convert_to_tensor(tape.gradient(loss, var)).numpy()[0]
  got = model.get_layer('gmf_user_embedding').get_weights()[0][user]
  np.testing.assert_allclose(got, start - 0.5 * grad, rtol=1e-5, atol=1e-6)
  # A user without support rows keeps the initial on-device row.
  idle = sorted(set(range(split.train.num_users)) - set(rows.users.tolist()))
  if idle:
    np.testing.assert_allclose(model.get_layer('gmf_user_embedding').get_weights()[0][idle[0]],
                               start, atol=1e-7)


def _ncf_like():
  r = synthetic.synthetic_ratings(num_users=30, num_items=60, mean_ratings_per_user=8,
                                  seed=2).ratings
  return splits.split_leave_one_out(r, num_negatives=5, seed=0)


def test_only_constant_sgd():
  split = _split()
  spec = _spec(split, embedding_dim=2)
  rec = spec.build(model_fns.UserEmbedding.LOCAL)
  rows = local_recon.rating_support_rows(split.test, 3)
  with pytest.raises(ValueError, match='constant-rate SGD'):
    local_recon.reconstruct(spec, rec.keras_model, rows, optimizers.OptimizerConfig('adam', 0.1))


def test_tff_weights_roundtrip():
  split = _split()
  spec = _spec(split, embedding_dim=2)
  rec = _random_global(spec)
  weights = common.global_weights(spec, rec.keras_model)
  assert isinstance(weights, tff.learning.models.ModelWeights)
  assert len(weights.trainable) == len([v for v in rec.global_variables if v.trainable])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
