"""TFLite artifacts run in tf.lite.Interpreter and match the float model."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from compression import tflite_export
from tests.export import run_fixtures
from tff_rec.export import serving
from tff_rec.training import artifacts
from tff_rec.training import data_setup

# Full-integer TFLite also quantizes activations (the score range in 8 bits):
# measured 0.034 on the synthetic MF run; dynamic range measured 0.
INT8_TOLERANCE = 0.1


@pytest.mark.parametrize('mode,tolerance', [('dynamic', 1e-4), ('int8', INT8_TOLERANCE)])
def test_table_model_parity(mf_run, tmp_path, mode, tolerance):
  rec, cfg, _, _ = artifacts.load_final_model(mf_run)
  split = data_setup.load_split(run_fixtures.synthetic_data())
  rep = tflite_export.representative_pairs(split.train.users, split.train.items)
  content = tflite_export.convert(rec.keras_model, mode, rep)
  inputs = {'user': split.test.users.astype(np.int32), 'item': split.test.items.astype(np.int32)}
  reference = rec.keras_model(inputs).numpy()
  assert tflite_export.verify(content, reference, inputs) <= tolerance
  path = tflite_export.write(str(tmp_path / 'm' / 'model.tflite'), content)
  assert open(path, 'rb').read() == content
  if mode == 'int8':
    details = tf.lite.Interpreter(model_content=content).get_tensor_details()
    assert any(d['dtype'] == np.int8 for d in details)


def test_fedrecon_score_from_history_parity(fedrecon_run):
  rec, _, _, _ = artifacts.load_final_model(fedrecon_run)
  l2 = serving.DEFAULT_RECON_L2
  inputs = dict(history_item=np.array([1, 2, 3, 9], np.int32),
                history_rating=np.array([5, 1, 3, 4], np.float32),
                item=np.arange(20, dtype=np.int32))
  content = tflite_export.convert_recon(rec.keras_model, 'dynamic', l2)
  reference = tflite_export.recon_reference(rec.keras_model, l2)(
      **{k: tf.constant(v) for k, v in inputs.items()})
  assert tflite_export.verify(content, reference, inputs) <= 1e-4


def test_bad_modes():
  model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
  with pytest.raises(ValueError, match='tflite mode'):
    tflite_export.convert(model, 'float8')
  with pytest.raises(ValueError, match='representative'):
    tflite_export.convert(model, 'int8')


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
