"""Post-training int8 / float16 storage and quantization-aware training."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from compression import quantization
from tests.export import run_fixtures
from tff_rec.models import registry
from tff_rec.training import artifacts
from tff_rec.training import data_setup


@pytest.fixture(scope='module')
def mf(mf_run):
  return artifacts.load_final_model(mf_run)


def _pairs(n_users, n_items, n=200):
  rng = np.random.default_rng(0)
  return {'user': tf.constant(rng.integers(0, n_users, n), tf.int32),
          'item': tf.constant(rng.integers(0, n_items, n), tf.int32)}


def test_int8_per_row_error_is_at_most_half_a_step():
  w = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
  w[3] = 0.0  # an all-zero row
  q, scale = quantization.quantize_int8(w, 0)
  assert q.dtype == np.int8 and scale.shape == (50, 1)
  assert np.abs(q).max() == 127
  err = np.abs(quantization.dequantize_int8(q, scale) - w)
  assert np.all(err <= scale / 2 + 1e-7)
  assert np.all(quantization.dequantize_int8(q, scale)[3] == 0)
  q, scale = quantization.quantize_int8(w[:, :1], None)
  assert scale.shape == (1, 1)


# Measured max diffs on the synthetic MF run: int8 0.016, float16 0.0005.
@pytest.mark.parametrize('mode,tolerance', [('int8', 0.03), ('float16', 2e-3)])
def test_storage_clone_stores_compressed_weights(mf, mode, tolerance):
  rec, cfg, _, _ = mf
  stored, report = quantization.quantize_storage(rec.keras_model, mode)
  dtype = tf.int8 if mode == 'int8' else tf.float16
  table = [w for w in stored.weights if w.name.startswith('item_embedding/')]
  assert any(w.dtype == dtype for w in table)
  assert not any(w.dtype == tf.float32 and w.shape == (cfg['num_items'], 8) for w in stored.weights)
  x = _pairs(cfg['num_users'], cfg['num_items'])
  diff = np.abs(stored(x).numpy() - rec.keras_model(x).numpy()).max()
  assert diff <= tolerance
  assert report.max_abs_error > 0
  names = dict((n, kind) for n, kind, _ in report.layers)
  assert names['global_bias'] == 'float32'
  if mode == 'int8':
    assert names['item_embedding'] == 'int8 per-row (float16 scales)'
    assert names['item_bias'] == 'int8'
    scales = [w for w in stored.weights if w.name == 'item_embedding/scale:0']
    assert scales and scales[0].dtype == tf.float16


def test_float16_scales_keep_the_error_bound():
  w = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
  assert quantization.scale_dtype_for(w, 0) == 'float16'
  q, scale = quantization.quantize_int8(w, 0, 'float16')
  assert scale.dtype == np.float16
  err = np.abs(quantization.dequantize_int8(q, scale) - w)
  assert np.all(err <= scale.astype(np.float32) / 2 + 1e-7)


@pytest.mark.parametrize('magnitude', [1e-7, 1e8])
def test_scales_outside_float16_range_stay_float32(magnitude):
  w = np.random.default_rng(2).normal(size=(10, 4)).astype(np.float32)
  w[0] *= magnitude  # one row whose scale float16 cannot hold
  assert quantization.scale_dtype_for(w, 0) == 'float32'
  layer = quantization.Int8EmbeddingLookup(10, 4, scale_dtype='float32')
  layer.build(None)
  assert layer.set_float(w) <= np.abs(w).max(axis=1).max() / 127 / 2 + 1e-6
  step = np.abs(w[0]).max() / 127
  assert np.all(np.abs(layer.full_table().numpy()[0] - w[0]) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize('name,hparams', [
    ('neumf', {'factors': 4, 'layers': (8, 4)}),
    ('two_tower', {'embedding_dim': 8, 'item_layers': (8,)}),
    ('ncf_softmax', {}),
])
def test_int8_storage_of_dense_models(name, hparams):
  model = registry.build_model(name, 20, 30, init_stddev=0.3, **hparams).keras_model \
      if name != 'ncf_softmax' else registry.build_model(name, 20, 30).keras_model
  stored, report = quantization.quantize_storage(model, 'int8')
  assert any(kind == 'int8 per-output' for _, kind, _ in report.layers)
  x = _pairs(20, 30)
  np.testing.assert_allclose(stored(x).numpy(), model(x).numpy(), atol=0.05)


def test_unsupported_layers_raise():
  inputs = {'user': tf.keras.Input((), dtype=tf.int32, name='user'),
            'item': tf.keras.Input((), dtype=tf.int32, name='item')}
  x = tf.keras.layers.Lambda(lambda t: tf.cast(tf.stack([t[0], t[1]], 1), tf.float32))(
      [inputs['user'], inputs['item']])
  x = tf.keras.layers.BatchNormalization(name='bn')(x)
  model = tf.keras.Model(inputs, tf.keras.layers.Reshape(())(tf.keras.layers.Dense(1)(x)))
  with pytest.raises(quantization.UnsupportedModelError, match="'bn'.*BatchNormalization"):
    quantization.quantize_storage(model, 'int8')
  with pytest.raises(quantization.UnsupportedModelError, match='BatchNormalization'):
    quantization.qat_model(model)
  with pytest.raises(ValueError, match='storage mode'):
    quantization.storage_fn('int4')


def test_qat_fake_quantizer_is_the_int8_export_scheme(mf):
  rec, cfg, _, _ = mf
  split = data_setup.load_split(run_fixtures.synthetic_data())
  tuned, losses = quantization.qat_finetune(
      rec.keras_model, 'rating', split.train, quantization.QatConfig(epochs=1, batch_size=64))
  assert len(losses) == 1 and np.isfinite(losses[0])
  assert [l.name for l in tuned.layers] == [l.name for l in rec.keras_model.layers]
  x = _pairs(cfg['num_users'], cfg['num_items'])
  fake = quantization.qat_model(tuned)(x).numpy()
  stored = quantization.quantize_storage(tuned, 'int8')[0](x).numpy()
  np.testing.assert_allclose(fake, stored, atol=1e-5)
  # The fine-tuned model moved away from the original.
  assert np.abs(tuned(x).numpy() - rec.keras_model(x).numpy()).max() > 1e-4


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
