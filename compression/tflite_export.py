"""TFLite artifacts of a trained recommender for on-device scoring.

* Table models: the Keras scoring model itself, `serving_default(user:
  int32[B], item: int32[B]) -> float32[B]` over dense indices (the app maps
  raw ids with the run's `user_ids.txt` / `item_ids.txt`).
* FedRecon MF (`user_embedding == 'local'`): `score_from_history(
  history_item: int32[H], history_rating: float32[H], item: int32[C]) ->
  float32[C]`, the closed-form ridge reconstruction of
  `tff_rec.export.serving` in the graph; its Cholesky solve is not a TFLite
  builtin, so the model uses TF select ops (the Flex delegate, linked into
  the TensorFlow pip package's interpreter; an app needs
  `tensorflow-lite-select-tf-ops`).

Modes: 'dynamic' (dynamic-range: weights stored int8, float kernels) and
'int8' (full integer quantization calibrated on a representative dataset of
real (user, item) pairs; int32 ids in, float32 score out). `verify` runs the
artifact with `tf.lite.Interpreter` against the float model.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import tensorflow as tf

from tff_rec import atomic

MODES = ('dynamic', 'int8')
RECON_SIGNATURE = 'score_from_history'


def convert(keras_model: tf.keras.Model, mode: str,
            representative: Optional[Callable[[], Iterable[Mapping[str, np.ndarray]]]] = None) -> bytes:
  """A TFLite flatbuffer of a table model's scoring function."""
  if mode not in MODES:
    raise ValueError(f'tflite mode must be one of {list(MODES)}, got {mode!r}')
  converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if mode == 'int8':
    if representative is None:
      raise ValueError('int8 TFLite needs a representative dataset of (user, item) batches')
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter.convert()


class _ReconScorer(tf.Module):
  """MF scoring from a history, item factors frozen (see tff_rec.export.serving)."""

  def __init__(self, keras_model: tf.keras.Model, l2: float):
    super().__init__()
    names = {layer.name for layer in keras_model.layers}
    self.q = tf.Variable(keras_model.get_layer('item_embedding').get_weights()[0], trainable=False)
    self.has_bias = 'item_bias' in names
    if self.has_bias:
      self.b = tf.Variable(keras_model.get_layer('item_bias').get_weights()[0][:, 0], trainable=False)
    mu = keras_model.get_layer('global_bias').get_weights()[0] if 'global_bias' in names else 0.0
    self.mu = tf.Variable(np.float32(mu), trainable=False)
    self.l2 = float(l2)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name='history_item'),
                                tf.TensorSpec([None], tf.float32, name='history_rating'),
                                tf.TensorSpec([None], tf.int32, name='item')])
  def score_from_history(self, history_item, history_rating, item):
    x = tf.gather(self.q, history_item)
    b = tf.gather(self.b, history_item) if self.has_bias else 0.0
    y = history_rating - self.mu - b
    if self.has_bias:
      x = tf.concat([x, tf.ones_like(x[:, :1])], axis=1)
    n = tf.cast(tf.shape(x)[0], tf.float32)
    a = tf.matmul(x, x, transpose_a=True) + self.l2 * tf.maximum(n, 1.0) * tf.eye(tf.shape(x)[1])
    sol = tf.linalg.cholesky_solve(tf.linalg.cholesky(a), tf.matmul(x, y[:, None], transpose_a=True))[:, 0]
    q = tf.gather(self.q, item)
    if self.has_bias:
      return {'score': tf.linalg.matvec(q, sol[:-1]) + sol[-1] + tf.gather(self.b, item) + self.mu}
    return {'score': tf.linalg.matvec(q, sol) + self.mu}


def convert_recon(keras_model: tf.keras.Model, mode: str, l2: float,
                  representative: Optional[Callable[[], Iterable[Mapping[str, np.ndarray]]]] = None) -> bytes:
  """A TFLite flatbuffer of FedRecon MF's `score_from_history`."""
  if mode not in MODES:
    raise ValueError(f'tflite mode must be one of {list(MODES)}, got {mode!r}')
  module = _ReconScorer(keras_model, l2)
  fn = module.score_from_history.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
  if mode == 'int8':
    if representative is None:
      raise ValueError('int8 TFLite needs a representative dataset')
    converter.representative_dataset = representative
  return converter.convert()


def recon_reference(keras_model: tf.keras.Model, l2: float) -> Callable[..., np.ndarray]:
  """The float `score_from_history` in TensorFlow (the parity reference)."""
  module = _ReconScorer(keras_model, l2)
  return lambda **kw: module.score_from_history(**kw)['score'].numpy()


def write(path: str, content: bytes) -> str:
  """Writes a flatbuffer atomically."""
  return atomic.write(path, content)


def run(content: bytes, inputs: Mapping[str, np.ndarray], signature: Optional[str] = None) -> np.ndarray:
  """Runs a TFLite model's (only or named) signature; its single output."""
  interpreter = tf.lite.Interpreter(model_content=content)
  runner = interpreter.get_signature_runner(signature)
  out = runner(**{k: np.asarray(v) for k, v in inputs.items()})
  if len(out) != 1:
    raise ValueError(f'expected one output, got {sorted(out)}')
  return next(iter(out.values()))


def verify(content: bytes, reference: np.ndarray, inputs: Mapping[str, np.ndarray],
           signature: Optional[str] = None) -> float:
  """Max |tflite - reference| over `inputs`."""
  got = run(content, inputs, signature)
  return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(reference, np.float64))))


def representative_pairs(users: np.ndarray, items: np.ndarray, batch_size: int = 64,
                         max_batches: int = 100, seed: int = 0) -> Callable[[], Iterable[dict]]:
  """A representative dataset of (user, item) batches for int8 calibration.

  Batches are all the same size (a random sample of the pairs): the
  calibrator resizes inputs between batches, which TFLite's BATCH_MATMUL
  fails on.
  """
  users = np.asarray(users, np.int32)
  items = np.asarray(items, np.int32)
  size = min(batch_size, len(users))
  if size == 0:
    raise ValueError('no pairs for the representative dataset')
  order = np.random.default_rng(seed).permutation(len(users))
  batches = max(1, min(max_batches, len(users) // size))

  def gen():
    for n in range(batches):
      rows = order[n * size:(n + 1) * size]
      yield {'user': users[rows], 'item': items[rows]}

  return gen
