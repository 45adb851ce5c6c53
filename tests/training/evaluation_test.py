"""Federated evaluation: table, reconstruction and fine-tuning paths."""

import sys
import functools

import numpy as np
import pytest

from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.models import predictions
from tff_rec.training import evaluation
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@pytest.fixture(scope='module')
def data():
  s = synthetic.synthetic_ratings(num_users=30, num_items=15, rank=2, noise_std=0.1,
                                  mean_ratings_per_user=10, seed=5)
  return s


def _spec(r, **kw):
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', embedding_dim=2, init_stddev=0.3,
                                global_mean=float(r.ratings.mean()), **kw),
      num_users=r.num_users, num_items=r.num_items, task='rating', seed=1)


def _true_item_weights(spec, data, user_embedding):
  """Global weights whose item factors are the generator's true ones."""
  rec = spec.build(user_embedding)
  layer = {l.name: l for l in rec.keras_model.layers}
  layer['item_embedding'].embeddings.assign(data.item_factors.astype(np.float32))
  layer['global_bias'].bias.assign(data.center)
  return rec


def test_table_eval_equals_central_prediction(data, tff_context):
  del tff_context
  split = splits.split_random(data.ratings, fractions=(0.8, 0.0, 0.2), seed=0)
  spec = _spec(data.ratings)
  ev = evaluation.FederatedEvaluator(spec, model_fns.UserEmbedding.TABLE, split.train, split.test,
                                     batch_size=4)
  rec = spec.build(model_fns.UserEmbedding.TABLE)
  weights = model_fns_weights(rec.keras_model)
  metrics = ev(weights)
  pred = predictions.predict(rec.keras_model, split.test.users, split.test.items)
  np.testing.assert_allclose(metrics['mse'], np.mean((pred - split.test.ratings) ** 2), rtol=1e-4)
  assert metrics['num_examples'] == len(split.test)


def model_fns_weights(keras_model):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  return tff.learning.models.ModelWeights.from_model(keras_model)


@pytest.mark.parametrize('heldout', [False, True])
def test_reconstruction_uses_support_ratings(data, tff_context, heldout):
  """With the true item factors, rebuilding the user row beats a zero row."""
  del tff_context
  if heldout:
    split = splits.split_by_user(data.ratings, fractions=(0.6, 0.2, 0.2), seed=0)
  else:
    split = splits.split_random(data.ratings, fractions=(0.7, 0.0, 0.3), seed=0)
  spec = _spec(data.ratings, use_biases=True)
  rec = _true_item_weights(spec, data, model_fns.UserEmbedding.LOCAL)
  trainable = [v for v in rec.global_variables if v.trainable]
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  weights = tff.learning.models.ModelWeights(trainable=[v.numpy() for v in trainable], non_trainable=[])

  def run(recon_epochs, lr):
    ev = evaluation.FederatedEvaluator(
        spec, model_fns.UserEmbedding.LOCAL, None if heldout else split.train, split.test,
        batch_size=2, heldout_users=heldout,
        recon=evaluation.ReconEvalConfig(optimizers.OptimizerConfig('sgd', lr), recon_epochs=recon_epochs))
    return ev(weights)['rmse']

  tiny = run(1, 1e-6)
  rebuilt = run(20, 0.3)
  assert rebuilt < 0.8 * tiny, (tiny, rebuilt)


def test_finetune_personalizes_a_shared_model(data, tff_context):
  del tff_context
  split = splits.split_random(data.ratings, fractions=(0.7, 0.0, 0.3), seed=1)
  spec = _spec(data.ratings)
  rec = _true_item_weights(spec, data, model_fns.UserEmbedding.SHARED)
  ev = evaluation.FinetuneEvaluator(
      spec, model_fns.UserEmbedding.SHARED, split.train, split.test, batch_size=2,
      finetune_epochs=10, finetune_optimizer=optimizers.OptimizerConfig('sgd', 0.2))
  users = ev.user_ids[:8]
  out = ev(model_fns_weights(rec.keras_model), user_ids=users)
  assert out['num_examples'] == np.isin(split.test.users, users).sum()
  assert out['finetune/rmse'] < 0.9 * out['baseline/rmse'], out


def test_alternate_batches_partition_each_user_in_time_order(data):
  support, query = evaluation.alternate_batches(data.ratings, batch_size=3)
  assert len(support) + len(query) == len(data.ratings)
  for u in data.ratings.present_users()[:5]:
    mine = data.ratings.select(data.ratings.users == u).sorted_by_user()
    expect_support = [i for k, i in enumerate(mine.items.tolist()) if (k // 3) % 2 == 0]
    assert support.items[support.users == u].tolist() == expect_support


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
