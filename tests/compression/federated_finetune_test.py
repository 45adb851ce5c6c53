"""Federated fine-tuning of pruned models with fixed masks (FedAvg and FedRecon)."""

import sys
import os

import numpy as np
import pytest
import tensorflow as tf

from compression import federated_finetune
from compression import pruning
from tests.export import run_fixtures
from tff_rec.models import base
from tff_rec.models import registry
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import model_fns

_CONFIG = federated_finetune.FederatedFinetuneConfig(
    rounds=3, clients_per_round=10, client_learning_rate=0.05, batch_size=8)


@pytest.fixture(scope='module')
def split():
  return data_setup.load_split(run_fixtures.synthetic_data())


def test_masked_lookup_blocks_output_and_gradient():
  layer = base.EmbeddingLookup(4, 3, l2=0.5, initializer='ones')
  layer.build(None)
  mask = np.array([[1, 0, 1]] * 4, np.uint8)
  layer.set_mask(mask)
  layer.embeddings.assign(np.full((4, 3), 2.0, np.float32))
  with tf.GradientTape() as tape:
    out = layer(tf.constant([0, 2]))
    loss = tf.reduce_sum(out)
  np.testing.assert_array_equal(out.numpy(), [[2, 0, 2], [2, 0, 2]])
  grad = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings)).numpy()
  assert np.all(grad[:, 1] == 0) and np.all(grad[[0, 2]][:, [0, 2]] > 0)
  with pytest.raises(ValueError, match='mask shape'):
    layer.set_mask(np.ones((4, 2)))
  with pytest.raises(ValueError, match='only 0 and 1'):
    layer.set_mask(np.full((4, 3), 2))
  layer.set_mask(None)
  assert layer(tf.constant([1])).numpy()[0, 1] == 2.0


def test_spec_masks_only_embedding_tables():
  spec = model_fns.ModelSpec(
      builder=lambda u, i, **kw: registry.build_model('neumf', u, i, factors=4, layers=(8, 4), **kw),
      num_users=5, num_items=6, task='implicit', masks={'mlp_dense_0': np.ones((16, 8))})
  with pytest.raises(ValueError, match="'mlp_dense_0'.*only EmbeddingLookup"):
    spec.build(model_fns.UserEmbedding.TABLE)


def test_pruned_dense_layers_are_refused():
  rec = registry.build_model('neumf', 20, 30, factors=4, layers=(8, 4), init_stddev=0.3)
  pruned = pruning.prune(rec.keras_model, 'implicit', None, pruning.PruningConfig(0.5, 'constant', 0))
  with pytest.raises(ValueError, match='Dense.*prune_dense=False'):
    federated_finetune.masks_of(pruned.model)


def test_neumf_tables_pruned_and_finetuned_with_dense_layers_dense(split, tff_context, tmp_path):
  del tff_context
  hparams = dict(factors=4, layers=(8, 4))
  train = split.train
  rec = registry.build_model('neumf', train.num_users, train.num_items, init_stddev=0.3, **hparams)
  pruned = pruning.prune(rec.keras_model, 'implicit', None,
                         pruning.PruningConfig(0.6, 'constant', 0, prune_dense=False))
  assert not any('dense' in name or name == 'prediction' for name in pruned.pruned_layers)
  model_config = {'model': 'neumf', 'hparams': hparams, 'task': 'implicit',
                  'num_users': train.num_users, 'num_items': train.num_items,
                  'user_embedding': 'table', 'seed': 0}
  result = federated_finetune.finetune(pruned.model, model_config, train, _CONFIG,
                                       str(tmp_path / 'ft'))
  assert set(result.masks) == set(pruned.pruned_layers)
  for name in result.masks:
    old = pruned.model.get_layer(name).get_weights()[0]
    new = result.model.get_layer(name).get_weights()[0]
    np.testing.assert_array_equal(new == 0, old == 0)
  kernel = result.model.get_layer('mlp_dense_0').get_weights()[0]
  assert np.all(kernel != 0)
  assert np.abs(kernel - pruned.model.get_layer('mlp_dense_0').get_weights()[0]).max() > 1e-5


def test_fedavg_finetuning_keeps_the_sparsity_pattern(mf_run, split, tff_context, tmp_path):
  del tff_context
  rec, model_config, _, _ = artifacts.load_final_model(mf_run)
  pruned = pruning.prune(rec.keras_model, 'rating', None, pruning.PruningConfig(0.7, 'constant', 0))
  before = pruned.model.get_weights()
  run_dir = str(tmp_path / 'ft')
  result = federated_finetune.finetune(pruned.model, model_config, split.train, _CONFIG, run_dir)
  assert set(result.masks) == {'user_embedding', 'item_embedding'}
  for name in ('user_embedding', 'item_embedding'):
    old = pruned.model.get_layer(name).get_weights()[0]
    new = result.model.get_layer(name).get_weights()[0]
    np.testing.assert_array_equal(new == 0, old == 0)  # same zeros, none regrown
    assert np.abs(new - old).max() > 1e-4  # the kept weights were trained
  assert result.sparsity['item_embedding/embeddings:0'] == pytest.approx(0.7, abs=0.01)
  # The input model is untouched; training metrics were logged for each round.
  for a, b in zip(before, pruned.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  losses = [v for k, v in result.metrics.items() if k.endswith('train/loss')]
  assert losses and np.isfinite(float(losses[0]))
  assert result.metrics['round_num'] == str(_CONFIG.rounds)
  assert os.path.exists(os.path.join(run_dir, 'metrics.csv'))
  rmse_pruned = central.evaluate(pruned.model, 'rating', split, 'test', 10)['rmse']
  rmse_tuned = central.evaluate(result.model, 'rating', split, 'test', 10)['rmse']
  assert np.isfinite(rmse_tuned) and rmse_tuned < rmse_pruned + 0.05
  # Resuming a finished fine-tuning trains no further and gives the same weights.
  again = federated_finetune.finetune(pruned.model, model_config, split.train, _CONFIG, run_dir)
  for a, b in zip(again.model.get_weights(), result.model.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Other inputs in the same directory are refused, not silently resumed.
  with pytest.raises(ValueError, match='fine-tuning of other inputs'):
    federated_finetune.finetune(pruned.model, model_config, split.train,
                                federated_finetune.FederatedFinetuneConfig(
                                    rounds=4, clients_per_round=10, batch_size=8), run_dir)


def test_fedrecon_finetuning_keeps_user_rows_local(fedrecon_run, split, tff_context, tmp_path):
  del tff_context
  rec, model_config, _, _ = artifacts.load_final_model(fedrecon_run)
  local = [layer.name for layer in rec.local_layers]
  pruned = pruning.prune(rec.keras_model, 'rating', None, pruning.PruningConfig(0.5, 'constant', 0),
                         exclude=local)
  result = federated_finetune.finetune(pruned.model, model_config, split.train, _CONFIG,
                                       str(tmp_path / 'ft'))
  assert set(result.masks) == {'item_embedding'}
  old = pruned.model.get_layer('item_embedding').get_weights()[0]
  new = result.model.get_layer('item_embedding').get_weights()[0]
  np.testing.assert_array_equal(new == 0, old == 0)
  assert np.abs(new - old).max() > 1e-4
  for name in local:  # on-device rows are not the server's to change
    for a, b in zip(pruned.model.get_layer(name).get_weights(),
                    result.model.get_layer(name).get_weights()):
      np.testing.assert_array_equal(a, b)


def test_unpruned_model_and_bad_config_are_refused(mf_run, split):
  rec, model_config, _, _ = artifacts.load_final_model(mf_run)
  dense = tf.keras.models.clone_model(rec.keras_model)
  dense.set_weights([np.where(w == 0, 1e-3, w) for w in rec.keras_model.get_weights()])
  with pytest.raises(ValueError, match='no pruned embedding table'):
    federated_finetune.finetune(dense, model_config, split.train, _CONFIG, '/nonexistent')
  with pytest.raises(ValueError, match='clients_per_round'):
    federated_finetune.finetune(rec.keras_model, model_config, split.train,
                                federated_finetune.FederatedFinetuneConfig(clients_per_round=10**6),
                                '/nonexistent', masks={'item_embedding': np.ones((1, 1))})
  with pytest.raises(ValueError, match='positive'):
    federated_finetune.FederatedFinetuneConfig(rounds=0)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
