"""Every registered model: shapes, partition, seeding, personal variant, training."""

import sys
import collections

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import base
from tff_rec.models import registry

NUM_USERS, NUM_ITEMS = 8, 12

# Variables of the user-side (local in the personal variant) layers.
USER_VARIABLES = {
    'mf': {'user_embedding/embeddings:0', 'user_bias/embeddings:0'},
    'gmf': {'gmf_user_embedding/embeddings:0'},
    'mlp': {'mlp_user_embedding/embeddings:0'},
    'neumf': {'gmf_user_embedding/embeddings:0', 'mlp_user_embedding/embeddings:0'},
    'ncf_softmax': {'mf_user_embedding/embeddings:0', 'mlp_user_embedding/embeddings:0'},
    'two_tower': {'user_embedding/embeddings:0'},
}
ITEM_TABLES = {
    'mf': {'item_embedding', 'item_bias'},
    'gmf': {'gmf_item_embedding'},
    'mlp': {'mlp_item_embedding'},
    'neumf': {'gmf_item_embedding', 'mlp_item_embedding'},
    'ncf_softmax': {'mf_item_embedding', 'mlp_item_embedding'},
    'two_tower': {'item_embedding'},
}


def _inputs(users, items) -> collections.OrderedDict:
  return collections.OrderedDict(user=np.asarray(users, np.int32), item=np.asarray(items, np.int32))


def _all_pairs() -> tuple[np.ndarray, np.ndarray]:
  users, items = np.meshgrid(np.arange(NUM_USERS), np.arange(NUM_ITEMS), indexing='ij')
  return users.reshape(-1).astype(np.int32), items.reshape(-1).astype(np.int32)


def _names(variables) -> set[str]:
  return {v.name for v in variables}


def test_names_and_tasks():
  assert registry.MODEL_NAMES == ('mf', 'gmf', 'mlp', 'neumf', 'ncf_softmax', 'two_tower')
  assert set(USER_VARIABLES) == set(registry.MODEL_NAMES)
  tasks = {name: registry.default_task(name) for name in registry.MODEL_NAMES}
  assert tasks == {'mf': 'rating', 'gmf': 'implicit', 'mlp': 'implicit', 'neumf': 'implicit',
                   'ncf_softmax': 'rating', 'two_tower': 'implicit'}
  assert registry.default_task('neumf', task='rating') == 'rating'
  assert registry.default_task('mf', embedding_dim=4) == 'rating'
  with pytest.raises(ValueError, match='unknown task'):
    registry.default_task('gmf', task='ranking')


def test_unknown_name_lists_valid_ones():
  valid = 'mf, gmf, mlp, neumf, ncf_softmax, two_tower'
  with pytest.raises(ValueError, match=f"unknown model 'svd'; valid: {valid}"):
    registry.build_model('svd', NUM_USERS, NUM_ITEMS)
  with pytest.raises(ValueError, match='unknown model'):
    registry.default_task('svd')


def test_unknown_hparam_is_named():
  message = r"'gmf' has no hyperparameter\(s\) embedding_dim; valid: factors"
  with pytest.raises(ValueError, match=message):
    registry.build_model('gmf', NUM_USERS, NUM_ITEMS, embedding_dim=4)


def test_hparams_reach_the_builder():
  rec = registry.build_model('neumf', NUM_USERS, NUM_ITEMS, factors=3, layers=(6, 4), seed=2)
  assert rec.keras_model.get_layer('gmf_item_embedding').output_dim == 3
  assert rec.keras_model.get_layer('mlp_item_embedding').output_dim == 3
  assert rec.keras_model.get_layer('mlp_dense_0').units == 4


@pytest.mark.parametrize('personal', [False, True])
@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_output_shape_and_dtype(name, personal):
  rec = registry.build_model(name, NUM_USERS, NUM_ITEMS, personal=personal)
  out = rec.keras_model(_inputs([0, 3, 7, 7, 1], [0, 11, 5, 5, 2]))
  assert out.shape == (5,)
  assert out.dtype == tf.float32
  assert np.all(np.isfinite(out.numpy()))
  assert rec.personal == personal
  assert rec.task == registry.default_task(name)


@pytest.mark.parametrize('personal', [False, True])
@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_partition(name, personal):
  rec = registry.build_model(name, NUM_USERS, NUM_ITEMS, personal=personal)
  model_vars = {v.ref() for v in rec.keras_model.variables}
  global_vars = [v.ref() for v in rec.global_variables]
  local_vars = [v.ref() for v in rec.local_variables]
  # Every variable in exactly one part, none twice.
  assert len(set(global_vars)) == len(global_vars) and len(set(local_vars)) == len(local_vars)
  assert not set(global_vars) & set(local_vars)
  assert set(global_vars) | set(local_vars) == model_vars
  user_tables = {n.split('/')[0] for n in USER_VARIABLES[name]}
  if personal:
    assert _names(rec.local_variables) == USER_VARIABLES[name]
    assert set(rec.embedding_variable_names) == ITEM_TABLES[name]
  else:
    assert rec.local_variables == []
    assert set(rec.embedding_variable_names) == ITEM_TABLES[name] | user_tables
  for table in user_tables:
    rows = rec.keras_model.get_layer(table).input_dim
    assert rows == (1 if personal else NUM_USERS)
  # Each listed table is an EmbeddingLookup whose variables carry its name.
  trainable = _names(rec.keras_model.trainable_variables)
  for table in rec.embedding_variable_names:
    assert isinstance(rec.keras_model.get_layer(table), base.EmbeddingLookup)
    assert f'{table}/embeddings:0' in trainable


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_seeded_determinism(name):
  weights = [registry.build_model(name, NUM_USERS, NUM_ITEMS, seed=s).keras_model.get_weights()
             for s in (5, 5, 6)]
  assert len(weights[0]) == len(weights[1])
  for a, b in zip(weights[0], weights[1]):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(weights[0], weights[2]))
  users, items = _all_pairs()
  outs = [registry.build_model(name, NUM_USERS, NUM_ITEMS, seed=5).keras_model(
      _inputs(users, items)) for _ in range(2)]
  np.testing.assert_array_equal(outs[0].numpy(), outs[1].numpy())


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_personal_ignores_user(name):
  items = np.arange(NUM_ITEMS)
  personal = registry.build_model(name, NUM_USERS, NUM_ITEMS, personal=True).keras_model
  a = personal(_inputs(np.zeros_like(items), items)).numpy()
  b = personal(_inputs((items * 5 + 3) % NUM_USERS, items)).numpy()
  c = personal(_inputs(np.full_like(items, 10_000), items)).numpy()  # out of any table's range
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  # The table variant does use the user (so the check above is meaningful).
  table = registry.build_model(name, NUM_USERS, NUM_ITEMS).keras_model
  assert not np.allclose(table(_inputs(np.zeros_like(items), items)).numpy(),
                         table(_inputs(np.ones_like(items), items)).numpy(), atol=0, rtol=1e-6)


def _toy_dataset(task: str) -> tf.data.Dataset:
  users, items = _all_pairs()
  agree = (users % 2 == items % 2).astype(np.float32)
  y = agree if task == base.TASK_IMPLICIT else 3.0 + agree
  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=_inputs(users, items), y=y)
  ).map(lambda e: (e['x'], e['y'])).shuffle(200, seed=0).batch(16)


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_keras_fit_lowers_loss(name):
  rec = registry.build_model(name, NUM_USERS, NUM_ITEMS, seed=1)
  loss = (tf.keras.losses.BinaryCrossentropy(from_logits=True) if rec.task == base.TASK_IMPLICIT
          else tf.keras.losses.MeanSquaredError())
  rec.keras_model.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss=loss)
  data = _toy_dataset(rec.task)
  before = rec.keras_model.evaluate(data, verbose=0)
  rec.keras_model.fit(data, epochs=15, verbose=0)
  after = rec.keras_model.evaluate(data, verbose=0)
  assert after < 0.7 * before, (before, after)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
