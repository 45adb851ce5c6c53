"""Score-preserving SVD basis of MF tables, and pruning in it."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from compression import pruning
from compression import rotation
from tff_rec.models import registry


def _mf(num_users=40, num_items=30, dim=8, rank=None, seed=0, personal=False):
  """An MF with random tables; with `rank`, U V^T has that rank but U, V are dense."""
  rec = registry.build_model('mf', num_users, num_items, embedding_dim=dim, personal=personal)
  rng = np.random.default_rng(seed)
  users = rec.keras_model.get_layer('user_embedding').input_dim
  u, v = rng.normal(size=(users, dim)), rng.normal(size=(num_items, dim))
  if rank is not None:
    mix = rng.normal(size=(dim, dim))
    u = rng.normal(size=(users, rank)) @ rng.normal(size=(rank, dim)) @ mix
    v = rng.normal(size=(num_items, rank)) @ rng.normal(size=(rank, dim)) @ np.linalg.inv(mix).T
  rec.keras_model.get_layer('user_embedding').set_weights([u.astype(np.float32)])
  rec.keras_model.get_layer('item_embedding').set_weights([v.astype(np.float32)])
  for name, rows in (('user_bias', users), ('item_bias', num_items)):
    rec.keras_model.get_layer(name).set_weights([rng.normal(size=(rows, 1)).astype(np.float32)])
  return rec.keras_model


def _scores(model, num_users=40, num_items=30):
  users, items = np.meshgrid(np.arange(num_users), np.arange(num_items), indexing='ij')
  return model({'user': tf.constant(users.ravel(), tf.int32),
                'item': tf.constant(items.ravel(), tf.int32)}).numpy()


def test_balanced_svd_keeps_the_product_and_orders_energy():
  rng = np.random.default_rng(1)
  u, v = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
  u2, v2, s = rotation.balanced_svd(u, v)
  np.testing.assert_allclose(u2 @ v2.T, u @ v.T, atol=1e-9)
  gram = u2.T @ u2
  np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-8)  # orthogonal columns
  np.testing.assert_allclose(np.diag(gram), s, rtol=1e-8)  # column energy = singular values
  np.testing.assert_allclose(np.diag(v2.T @ v2), s, rtol=1e-8)
  assert np.all(np.diff(s) <= 0)
  assert (u2 ** 2).sum() + (v2 ** 2).sum() <= (u ** 2).sum() + (v ** 2).sum() + 1e-9
  # Deterministic signs: each column's largest user entry is positive.
  assert np.all(u2[np.argmax(np.abs(u2), axis=0), np.arange(6)] > 0)


def test_balanced_svd_with_fewer_rows_than_factors():
  rng = np.random.default_rng(2)
  u, v = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
  u2, v2, _ = rotation.balanced_svd(u, v)
  assert u2.shape == (3, 8) and v2.shape == (5, 8)
  np.testing.assert_allclose(u2 @ v2.T, u @ v.T, atol=1e-9)
  np.testing.assert_array_equal(u2[:, 3:], 0.0)
  with pytest.raises(ValueError, match='equal widths'):
    rotation.balanced_svd(u, v[:, :4])


def test_rotate_mf_keeps_every_score():
  model = _mf()
  before = _scores(model)
  s = rotation.rotate_mf(model)
  assert s.shape == (8,)
  np.testing.assert_allclose(_scores(model), before, atol=1e-4)


def test_which_models_qualify():
  assert rotation.dot_tables(_mf()) == ('user_embedding', 'item_embedding')
  neumf = registry.build_model('neumf', 10, 12, factors=4, layers=(8, 4)).keras_model
  assert rotation.dot_tables(neumf) is None
  assert rotation.resolve('auto', neumf) == 'none'
  with pytest.raises(ValueError, match='dot product'):
    rotation.resolve('svd', neumf)
  fedrecon = _mf(personal=True)
  local = ['user_embedding', 'user_bias']
  assert rotation.resolve('auto', fedrecon, exclude=local) == 'none'
  with pytest.raises(ValueError, match='stay on the device'):
    rotation.resolve('svd', fedrecon, exclude=local)
  assert rotation.resolve('none', _mf()) == 'none'
  with pytest.raises(ValueError, match='basis'):
    rotation.resolve('pca', _mf())


def test_pruning_in_the_svd_basis_keeps_a_low_rank_model():
  # U V^T has rank 2 in a dense random basis: 75% of the SVD-basis weights are zero.
  model = _mf(rank=2, seed=3)
  before = _scores(model)
  config = lambda basis: pruning.PruningConfig(0.75, 'constant', 0, basis=basis)
  svd = pruning.prune(model, 'rating', None, config('auto'))
  trained = pruning.prune(model, 'rating', None, config('none'))
  assert svd.basis == 'svd' and trained.basis == 'none'
  for result in (svd, trained):
    assert result.sparsity['item_embedding/embeddings:0'] == pytest.approx(0.75, abs=0.01)
  np.testing.assert_allclose(_scores(svd.model), before, atol=1e-3 * np.abs(before).max())
  assert np.abs(_scores(trained.model) - before).max() > 0.1 * np.abs(before).max()
  np.testing.assert_array_equal(_scores(model), before)  # the input model is untouched


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
