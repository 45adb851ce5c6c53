"""Magnitude pruning with TF-MOT, embedding tables included."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from compression import pruning
from tests.export import run_fixtures
from tff_rec.models import registry
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup


@pytest.fixture(scope='module')
def mf(mf_run):
  return artifacts.load_final_model(mf_run)


@pytest.fixture(scope='module')
def split():
  return data_setup.load_split(run_fixtures.synthetic_data())


def test_one_shot_constant_pruning(mf):
  rec = mf[0]
  before = [w.copy() for w in rec.keras_model.get_weights()]
  result = pruning.prune(rec.keras_model, 'rating', None,
                         pruning.PruningConfig(0.8, 'constant', 0, basis='none'))
  assert result.basis == 'none'
  assert result.pruned_layers == ('user_embedding', 'item_embedding')
  assert result.sparsity['user_embedding/embeddings:0'] == pytest.approx(0.8, abs=0.01)
  assert result.sparsity['item_embedding/embeddings:0'] == pytest.approx(0.8, abs=0.01)
  assert result.sparsity['item_bias/embeddings:0'] == 0.0
  # The kept weights are the largest ones, unchanged; the input model is untouched.
  table = rec.keras_model.get_layer('item_embedding').get_weights()[0]
  pruned = result.model.get_layer('item_embedding').get_weights()[0]
  kept = pruned != 0
  np.testing.assert_array_equal(pruned[kept], table[kept])
  assert np.abs(table[~kept]).max() <= np.abs(table[kept]).min()
  for a, b in zip(before, rec.keras_model.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert [l.name for l in result.model.layers] == [l.name for l in rec.keras_model.layers]


def test_polynomial_pruning_with_finetuning(mf, split):
  rec = mf[0]
  base_rmse = central.evaluate(rec.keras_model, 'rating', split, 'test', 10)['rmse']
  config = pruning.PruningConfig(0.6, 'polynomial', finetune_epochs=2, batch_size=64,
                                 learning_rate=0.003, prune_biases=True)
  result = pruning.prune(rec.keras_model, 'rating', split.train, config)
  assert len(result.losses) == 2 and all(np.isfinite(result.losses))
  for name in ('user_embedding', 'item_embedding', 'user_bias', 'item_bias'):
    assert result.sparsity[f'{name}/embeddings:0'] == pytest.approx(0.6, abs=0.01)
  rmse = central.evaluate(result.model, 'rating', split, 'test', 10)['rmse']
  assert rmse < base_rmse + 0.15


def test_dense_layers_and_exclusions():
  rec = registry.build_model('neumf', 20, 30, factors=4, layers=(8, 4), personal=True)
  local = [l.name for l in rec.local_layers]
  result = pruning.prune(rec.keras_model, 'implicit', None,
                         pruning.PruningConfig(0.5, 'constant', 0), exclude=local)
  assert 'mlp_dense_0' in result.pruned_layers and 'prediction' in result.pruned_layers
  assert not set(local) & set(result.pruned_layers)
  assert result.sparsity['mlp_dense_0/kernel:0'] == pytest.approx(0.5, abs=0.07)
  assert result.sparsity['gmf_user_embedding/embeddings:0'] == 0.0


def test_invalid_configs():
  with pytest.raises(ValueError, match='target_sparsity'):
    pruning.PruningConfig(1.0)
  with pytest.raises(ValueError, match='polynomial'):
    pruning.PruningConfig(0.5, 'polynomial', finetune_epochs=0)
  with pytest.raises(ValueError, match='schedule'):
    pruning.PruningConfig(0.5, 'cubic')
  with pytest.raises(ValueError, match='basis'):
    pruning.PruningConfig(0.5, basis='pca')
  with pytest.raises(ValueError, match='needs the training ratings'):
    pruning.prune(tf.keras.Sequential([tf.keras.layers.Dense(1)]), 'rating', None,
                  pruning.PruningConfig(0.5, 'constant', 1))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
