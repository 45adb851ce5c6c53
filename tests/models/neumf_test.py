"""NCF models: the GMF / MLP / NeuMF / NCF-softmax computations, by hand."""

import sys
import collections

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import base
from tff_rec.models import neumf

NUM_USERS, NUM_ITEMS = 6, 9
USERS = np.array([0, 5, 2, 2, 4], np.int32)
ITEMS = np.array([8, 0, 3, 4, 4], np.int32)


def _inputs(users=USERS, items=ITEMS) -> collections.OrderedDict:
  return collections.OrderedDict(user=users, item=items)


def _w(model: tf.keras.Model, layer: str) -> list[np.ndarray]:
  return model.get_layer(layer).get_weights()


def _randomize(model: tf.keras.Model, seed: int = 0) -> None:
  """Replaces every weight by a non-trivial random value."""
  rng = np.random.default_rng(seed)
  model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])


def _gmf_vector(model, users):
  return _w(model, 'gmf_user_embedding')[0][users] * _w(model, 'gmf_item_embedding')[0][ITEMS]


def _mlp_vector(model, users, num_dense):
  x = np.concatenate([_w(model, 'mlp_user_embedding')[0][users],
                      _w(model, 'mlp_item_embedding')[0][ITEMS]], axis=1)
  for k in range(num_dense):
    kernel, bias = _w(model, f'mlp_dense_{k}')
    x = np.maximum(x @ kernel + bias, 0.0)
  return x


def _dense1(model, layer, x):
  kernel, bias = _w(model, layer)
  return (x @ kernel + bias)[:, 0]


def test_gmf_is_dense_over_elementwise_product():
  rec = neumf.build_gmf(NUM_USERS, NUM_ITEMS, factors=4)
  model = rec.keras_model
  _randomize(model)
  assert _w(model, 'gmf_user_embedding')[0].shape == (NUM_USERS, 4)
  expected = _dense1(model, 'gmf_prediction', _gmf_vector(model, USERS))
  np.testing.assert_allclose(model(_inputs()).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mlp_tower_sizes_and_relu():
  rec = neumf.build_mlp(NUM_USERS, NUM_ITEMS, layers=(10, 6, 3))
  model = rec.keras_model
  _randomize(model)
  assert _w(model, 'mlp_user_embedding')[0].shape == (NUM_USERS, 5)  # layers[0] / 2
  assert _w(model, 'mlp_item_embedding')[0].shape == (NUM_ITEMS, 5)
  assert _w(model, 'mlp_dense_0')[0].shape == (10, 6)
  assert _w(model, 'mlp_dense_1')[0].shape == (6, 3)
  assert _w(model, 'mlp_prediction')[0].shape == (3, 1)
  expected = _dense1(model, 'mlp_prediction', _mlp_vector(model, USERS, 2))
  np.testing.assert_allclose(model(_inputs()).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_default_sizes_follow_the_paper():
  model = neumf.build_neumf(NUM_USERS, NUM_ITEMS).keras_model
  assert _w(model, 'gmf_user_embedding')[0].shape == (NUM_USERS, 8)
  assert _w(model, 'mlp_user_embedding')[0].shape == (NUM_USERS, 32)
  assert [model.get_layer(f'mlp_dense_{k}').units for k in range(3)] == [32, 16, 8]
  assert _w(model, 'prediction')[0].shape == (8 + 8, 1)


@pytest.mark.parametrize('personal', [False, True])
def test_neumf_concatenates_gmf_and_mlp(personal):
  rec = neumf.build_neumf(NUM_USERS, NUM_ITEMS, factors=3, layers=(8, 4, 2), personal=personal)
  model = rec.keras_model
  _randomize(model, seed=3)
  users = np.zeros_like(USERS) if personal else USERS
  vector = np.concatenate([_gmf_vector(model, users), _mlp_vector(model, users, 2)], axis=1)
  expected = _dense1(model, 'prediction', vector)
  np.testing.assert_allclose(model(_inputs()).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_rating_task_adds_global_mean():
  implicit = neumf.build_neumf(NUM_USERS, NUM_ITEMS, seed=4)
  rating = neumf.build_neumf(NUM_USERS, NUM_ITEMS, seed=4, task='rating', global_mean=3.5)
  assert rating.task == base.TASK_RATING and implicit.task == base.TASK_IMPLICIT
  assert 'global_bias/bias:0' in {v.name for v in rating.global_variables}
  np.testing.assert_allclose(rating.keras_model(_inputs()).numpy(),
                             implicit.keras_model(_inputs()).numpy() + 3.5, rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match='unknown task'):
    neumf.build_gmf(NUM_USERS, NUM_ITEMS, task='ranking')
  with pytest.raises(ValueError, match='must be even'):
    neumf.build_mlp(NUM_USERS, NUM_ITEMS, layers=(7, 4))
  with pytest.raises(ValueError, match='non-empty'):
    neumf.build_neumf(NUM_USERS, NUM_ITEMS, layers=())
  with pytest.raises(ValueError, match='at least 2'):
    neumf.build_ncf_softmax_rating(NUM_USERS, NUM_ITEMS, rating_values=(1.0,))


@pytest.mark.parametrize('task', ['implicit', 'rating'])
def test_pretrained_neumf_averages_gmf_and_mlp(task):
  kwargs = dict(factors=4, layers=(8, 4), task=task, global_mean=3.0)
  gmf = neumf.build_gmf(NUM_USERS, NUM_ITEMS, **{k: v for k, v in kwargs.items() if k != 'layers'})
  mlp = neumf.build_mlp(NUM_USERS, NUM_ITEMS, **{k: v for k, v in kwargs.items() if k != 'factors'})
  model = neumf.build_neumf(NUM_USERS, NUM_ITEMS, **kwargs)
  _randomize(gmf.keras_model, 1)
  _randomize(mlp.keras_model, 2)
  neumf.load_pretrained_neumf(model, gmf, mlp, alpha=0.3)
  expected = (0.3 * gmf.keras_model(_inputs()).numpy()
              + 0.7 * mlp.keras_model(_inputs()).numpy())
  np.testing.assert_allclose(model.keras_model(_inputs()).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_ncf_softmax_outputs_expected_rating():
  rec = neumf.build_ncf_softmax_rating(NUM_USERS, NUM_ITEMS)
  model = rec.keras_model
  _randomize(model, seed=5)
  assert rec.task == base.TASK_RATING
  assert _w(model, 'mf_user_embedding')[0].shape == (NUM_USERS, 5)
  assert _w(model, 'mlp_user_embedding')[0].shape == (NUM_USERS, 10)
  mf_vec = _w(model, 'mf_user_embedding')[0][USERS] * _w(model, 'mf_item_embedding')[0][ITEMS]
  mlp_vec = np.concatenate([_w(model, 'mlp_user_embedding')[0][USERS],
                            _w(model, 'mlp_item_embedding')[0][ITEMS]], axis=1)
  kernel, bias = _w(model, 'rating_logits')
  assert kernel.shape == (5 + 20, 5)
  logits = np.concatenate([mf_vec, mlp_vec], axis=1) @ kernel + bias
  np.testing.assert_allclose(neumf.rating_logits_model(rec)(_inputs()).numpy(), logits,
                             rtol=1e-5, atol=1e-5)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  expected = probs @ np.arange(1.0, 6.0)
  out = model(_inputs()).numpy()
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  assert np.all((out >= 1.0) & (out <= 5.0))


def test_ncf_softmax_custom_rating_values():
  rec = neumf.build_ncf_softmax_rating(NUM_USERS, NUM_ITEMS, rating_values=(0.5, 1.0))
  rec.keras_model.get_layer('rating_logits').set_weights(
      [np.zeros((25, 2), np.float32), np.array([0.0, np.log(3.0)], np.float32)])
  np.testing.assert_allclose(rec.keras_model(_inputs()).numpy(), 0.25 * 0.5 + 0.75 * 1.0, rtol=1e-6)


def test_rating_to_class():
  np.testing.assert_array_equal(neumf.rating_to_class(np.array([1.0, 2.0, 2.4, 4.6, 5.0])),
                                [0, 1, 1, 4, 4])
  np.testing.assert_array_equal(neumf.rating_to_class(np.array([0.5, 1.0]), (0.5, 1.0)), [0, 1])


def test_ncf_softmax_cross_entropy_training_via_logits():
  rec = neumf.build_ncf_softmax_rating(NUM_USERS, NUM_ITEMS, seed=1)
  logits_model = neumf.rating_logits_model(rec)
  users, items = np.meshgrid(np.arange(NUM_USERS), np.arange(NUM_ITEMS), indexing='ij')
  users, items = users.reshape(-1).astype(np.int32), items.reshape(-1).astype(np.int32)
  ratings = 1.0 + (users + items) % 5
  labels = neumf.rating_to_class(ratings)
  logits_model.compile(optimizer=tf.keras.optimizers.Adam(0.05),
                       loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x = _inputs(users, items)
  before = rec.keras_model(x).numpy()
  logits_model.fit(x, labels, batch_size=16, epochs=20, verbose=0)
  after = rec.keras_model(x).numpy()  # the shared weights moved the rating model too
  assert np.mean((after - ratings) ** 2) < 0.5 * np.mean((before - ratings) ** 2)


def test_layers_have_configs():
  layer = neumf.ExpectedRating((1.0, 2.0), name='e')
  assert neumf.ExpectedRating.from_config(layer.get_config()).rating_values == (1.0, 2.0)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
