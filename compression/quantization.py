"""Smaller stored weights: post-training int8 / float16 and quantization-aware training.

Post-training storage (`storage_fn('int8' | 'float16')`, used by
`tff_rec.export.serving.export(storage_fn=...)`): the scoring model is cloned
with layers that *store* compressed variables and dequantize in the graph, so
the SavedModel's `variables/` shrink while it stays a plain TF graph:

* int8: symmetric, `w ~= q * scale` with `q` int8 in [-127, 127] and
  `scale = max|row| / 127` per row of an embedding table (per item / user) and
  per output unit of a Dense kernel; one scale per tensor for 1-wide tables
  (the biases: a per-row scale would cost more than the value). A table's
  per-row scales are stored as float16 when every one of them is a normal
  float16 number (else float32); `q` is computed with the stored (rounded)
  scale, so the error bound is unchanged. Lookups gather the int8 rows and
  their scales, then multiply. Dense biases and the global bias stay float32.
  Max error per weight: scale / 2.
* float16: every embedding table and Dense kernel stored as float16 and cast
  to float32 on read.

Quantization-aware training (`qat_finetune`): TF-MOT's `quantize_apply` on
the Dense layers (default 8-bit scheme) and on the embedding tables through
`EmbeddingQuantizeConfig`, whose fake quantizer is exactly the per-row int8
scheme above (float16 scale rounding included), so the fine-tuned float
weights are those that the int8 export reproduces best. Models with weighted layers of other kinds raise
`UnsupportedModelError`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tff_rec.data import centralized
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base
from tff_rec.models import mf

STORAGE_MODES = ('int8', 'float16')
_QMAX = 127.0


class UnsupportedModelError(ValueError):
  """A model with layers the quantizer cannot handle."""


# ---------------------------------------------------------------------------
# Int8 math.


_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)


def _int8_scales(w: np.ndarray, axis: Optional[int]) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if axis is None:
    amax = np.full([1] * w.ndim, np.max(np.abs(w)) if w.size else 0.0, np.float32)
  else:
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
  scale = (amax / _QMAX).astype(np.float32)
  scale[scale == 0] = 1.0
  return scale


def scale_dtype_for(w: np.ndarray, axis: Optional[int]) -> str:
  """'float16' if every int8 scale of `w` is a normal float16 number, else 'float32'."""
  scale = _int8_scales(w, axis)
  ok = scale.size == 0 or (scale.min() >= _F16_MIN_NORMAL and scale.max() <= _F16_MAX)
  return 'float16' if ok else 'float32'


def quantize_int8(w: np.ndarray, axis: Optional[int],
                  scale_dtype: str = 'float32') -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 of `w` with one scale per slice along `axis` (None: per tensor).

  `axis=0` of an [N, D] table gives a scale per row ([N, 1]); `axis=1` of a
  [in, out] kernel gives one per output unit ([1, out]). The scale is returned
  as `scale_dtype`, and `q` is rounded against that stored value.
  """
  w = np.asarray(w, np.float32)
  scale = _int8_scales(w, axis).astype(scale_dtype)
  q = np.clip(np.round(w / scale.astype(np.float32)), -_QMAX, _QMAX).astype(np.int8)
  return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return q.astype(np.float32) * scale.astype(np.float32)


def _fake_quant_rows(w: tf.Tensor) -> tf.Tensor:
  """`Int8EmbeddingLookup`'s int8 quantize-dequantize, straight-through gradient.

  One scale per row of a [N, D>1] table, one per tensor otherwise.
  """
  per_row = w.shape.rank == 2 and w.shape[1] > 1
  if per_row:
    amax = tf.reduce_max(tf.abs(w), axis=1, keepdims=True)
  else:
    amax = tf.reduce_max(tf.abs(w))
  scale = tf.where(amax > 0, amax / _QMAX, tf.ones_like(amax))
  if per_row:  # float16 scales when all are normal float16 numbers (`scale_dtype_for`)
    fits = tf.reduce_all((scale >= _F16_MIN_NORMAL) & (scale <= _F16_MAX))
    scale = tf.where(fits, tf.cast(tf.cast(scale, tf.float16), tf.float32), scale)
  q = tf.clip_by_value(tf.round(w / scale), -_QMAX, _QMAX) * scale
  return w + tf.stop_gradient(q - w)


# ---------------------------------------------------------------------------
# Stored-compressed layers.


class Int8EmbeddingLookup(tf.keras.layers.Layer):
  """An embedding table stored as int8 rows with float16 or float32 scales."""

  def __init__(self, input_dim: int, output_dim: int, scale_dtype: str = 'float32', **kwargs):
    super().__init__(**kwargs)
    if scale_dtype not in ('float16', 'float32'):
      raise ValueError(f'scale_dtype must be float16 or float32, got {scale_dtype!r}')
    self.input_dim = int(input_dim)
    self.output_dim = int(output_dim)
    self.scale_dtype = scale_dtype
    self.per_row = self.output_dim > 1

  def build(self, input_shape):
    self.quantized = self.add_weight(name='quantized', shape=(self.input_dim, self.output_dim),
                                     dtype=tf.int8, initializer='zeros', trainable=False)
    self.scale = self.add_weight(name='scale', shape=(self.input_dim if self.per_row else 1, 1),
                                 dtype=self.scale_dtype, initializer='ones', trainable=False)
    super().build(input_shape)

  def call(self, ids):
    rows = tf.cast(tf.gather(self.quantized, ids), tf.float32)
    scale = tf.gather(self.scale, ids) if self.per_row else self.scale
    return rows * tf.cast(scale, tf.float32)

  def full_table(self) -> tf.Tensor:
    return tf.cast(self.quantized, tf.float32) * tf.cast(self.scale, tf.float32)

  def set_float(self, table: np.ndarray) -> float:
    """Stores a float table; returns the max abs quantization error."""
    q, scale = quantize_int8(table, 0 if self.per_row else None, self.scale_dtype)
    self.quantized.assign(q)
    self.scale.assign(scale)
    return float(np.max(np.abs(dequantize_int8(q, scale) - table))) if table.size else 0.0

  def get_config(self):
    config = super().get_config()
    config.update(input_dim=self.input_dim, output_dim=self.output_dim,
                  scale_dtype=self.scale_dtype)
    return config


class Float16EmbeddingLookup(tf.keras.layers.Layer):
  """An embedding table stored as float16."""

  def __init__(self, input_dim: int, output_dim: int, **kwargs):
    super().__init__(**kwargs)
    self.input_dim = int(input_dim)
    self.output_dim = int(output_dim)

  def build(self, input_shape):
    self.table = self.add_weight(name='table', shape=(self.input_dim, self.output_dim),
                                 dtype=tf.float16, initializer='zeros', trainable=False)
    super().build(input_shape)

  def call(self, ids):
    return tf.cast(tf.gather(self.table, ids), tf.float32)

  def full_table(self) -> tf.Tensor:
    return tf.cast(self.table, tf.float32)

  def set_float(self, table: np.ndarray) -> float:
    self.table.assign(table.astype(np.float16))
    return float(np.max(np.abs(table.astype(np.float16).astype(np.float32) - table))) if table.size else 0.0

  def get_config(self):
    config = super().get_config()
    config.update(input_dim=self.input_dim, output_dim=self.output_dim)
    return config


class _CompressedDense(tf.keras.layers.Layer):
  """Dense with a compressed kernel; float32 bias."""

  def __init__(self, units: int, activation=None, use_bias: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.units = int(units)
    self.activation = tf.keras.activations.get(activation)
    self.use_bias = bool(use_bias)

  def _kernel(self) -> tf.Tensor:
    raise NotImplementedError

  def call(self, x):
    y = tf.matmul(x, self._kernel())
    if self.use_bias:
      y = y + self.bias
    return self.activation(y)

  def _add_bias(self):
    if self.use_bias:
      self.bias = self.add_weight(name='bias', shape=(self.units,), initializer='zeros',
                                  trainable=False)

  def get_config(self):
    config = super().get_config()
    config.update(units=self.units, activation=tf.keras.activations.serialize(self.activation),
                  use_bias=self.use_bias)
    return config


class Int8Dense(_CompressedDense):
  """Dense with an int8 kernel and a float32 scale per output unit."""

  def build(self, input_shape):
    fan_in = int(input_shape[-1])
    self.quantized = self.add_weight(name='quantized', shape=(fan_in, self.units), dtype=tf.int8,
                                     initializer='zeros', trainable=False)
    self.scale = self.add_weight(name='scale', shape=(1, self.units), initializer='ones',
                                 trainable=False)
    self._add_bias()
    super().build(input_shape)

  def _kernel(self):
    return tf.cast(self.quantized, tf.float32) * self.scale

  def set_float(self, kernel: np.ndarray, bias: Optional[np.ndarray]) -> float:
    q, scale = quantize_int8(kernel, 1)
    self.quantized.assign(q)
    self.scale.assign(scale)
    if self.use_bias:
      self.bias.assign(bias)
    return float(np.max(np.abs(dequantize_int8(q, scale) - kernel)))


class Float16Dense(_CompressedDense):
  """Dense with a float16 kernel."""

  def build(self, input_shape):
    self.kernel16 = self.add_weight(name='kernel', shape=(int(input_shape[-1]), self.units),
                                    dtype=tf.float16, initializer='zeros', trainable=False)
    self._add_bias()
    super().build(input_shape)

  def _kernel(self):
    return tf.cast(self.kernel16, tf.float32)

  def set_float(self, kernel: np.ndarray, bias: Optional[np.ndarray]) -> float:
    self.kernel16.assign(kernel.astype(np.float16))
    if self.use_bias:
      self.bias.assign(bias)
    return float(np.max(np.abs(kernel.astype(np.float16).astype(np.float32) - kernel)))


_TABLE_LAYERS = {'int8': Int8EmbeddingLookup, 'float16': Float16EmbeddingLookup}
_DENSE_LAYERS = {'int8': Int8Dense, 'float16': Float16Dense}
# Weighted layers kept in float32 as they are.
_FLOAT_LAYERS = (mf.GlobalBias,)


@dataclasses.dataclass(frozen=True)
class StorageReport:
  """What `quantize_storage` did to each layer: (layer, stored form, max abs error)."""

  mode: str
  layers: tuple[tuple[str, str, float], ...]

  @property
  def max_abs_error(self) -> float:
    return max((e for _, _, e in self.layers), default=0.0)


def _check_layers(model: tf.keras.Model) -> None:
  for layer in model.layers:
    if not layer.weights:
      continue
    if isinstance(layer, (base.EmbeddingLookup, tf.keras.layers.Dense) + _FLOAT_LAYERS):
      continue
    raise UnsupportedModelError(
        f'layer {layer.name!r} ({type(layer).__name__}) has weights but is not an '
        'EmbeddingLookup, Dense or GlobalBias; no quantized form is defined for it')


def quantize_storage(model: tf.keras.Model, mode: str) -> tuple[tf.keras.Model, StorageReport]:
  """A clone of a float scoring model storing tables and kernels as `mode`."""
  if mode not in STORAGE_MODES:
    raise ValueError(f'storage mode must be one of {list(STORAGE_MODES)}, got {mode!r}')
  _check_layers(model)

  def clone(layer):
    if isinstance(layer, base.EmbeddingLookup):
      if mode == 'int8':
        table = layer.get_weights()[0]
        dtype = scale_dtype_for(table, 0) if layer.output_dim > 1 else 'float32'
        return Int8EmbeddingLookup(layer.input_dim, layer.output_dim, scale_dtype=dtype,
                                   name=layer.name)
      return _TABLE_LAYERS[mode](layer.input_dim, layer.output_dim, name=layer.name)
    if isinstance(layer, tf.keras.layers.Dense):
      return _DENSE_LAYERS[mode](layer.units, activation=layer.activation,
                                 use_bias=layer.use_bias, name=layer.name)
    return layer.__class__.from_config(layer.get_config())

  stored = tf.keras.models.clone_model(model, clone_function=clone)
  rows = []
  for layer in model.layers:
    if not layer.weights:
      continue
    new = stored.get_layer(layer.name)
    if isinstance(layer, base.EmbeddingLookup):
      err = new.set_float(layer.get_weights()[0])
      form = mode
      if getattr(new, 'per_row', False):
        form += f' per-row ({new.scale_dtype} scales)'
      rows.append((layer.name, form, err))
    elif isinstance(layer, tf.keras.layers.Dense):
      weights = layer.get_weights()
      err = new.set_float(weights[0], weights[1] if layer.use_bias else None)
      rows.append((layer.name, f'{mode}{" per-output" if mode == "int8" else ""}', err))
    else:
      new.set_weights(layer.get_weights())
      rows.append((layer.name, 'float32', 0.0))
  return stored, StorageReport(mode, tuple(rows))


def storage_fn(mode: str) -> Optional[Callable[[tf.keras.Model], tf.keras.Model]]:
  """`serving.export(storage_fn=...)` for 'int8' / 'float16' ('none': None)."""
  if mode in ('none', 'float32', None):
    return None
  if mode not in STORAGE_MODES:
    raise ValueError(f'storage mode must be one of {list(STORAGE_MODES)} or none, got {mode!r}')
  return lambda model: quantize_storage(model, mode)[0]


# ---------------------------------------------------------------------------
# Quantization-aware training.


class PerRowInt8Quantizer(tfmot.quantization.keras.quantizers.Quantizer):
  """Fake quantizer matching `Int8EmbeddingLookup` (per-row symmetric int8)."""

  def build(self, tensor_shape, name, layer):
    return {}

  def __call__(self, inputs, training, weights, **kwargs):
    return _fake_quant_rows(inputs)

  def get_config(self):
    return {}


class EmbeddingQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
  """QAT config of `EmbeddingLookup`: fake-quantize the table, not the outputs."""

  def get_weights_and_quantizers(self, layer):
    return [(layer.embeddings, PerRowInt8Quantizer())]

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    layer.embeddings = quantize_weights[0]

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    return []

  def get_config(self):
    return {}


def _custom_objects() -> dict:
  return {
      'EmbeddingLookup': base.EmbeddingLookup,
      'PersonalIndex': base.PersonalIndex,
      'DropLastAxis': base.DropLastAxis,
      'GlobalBias': mf.GlobalBias,
      'EmbeddingQuantizeConfig': EmbeddingQuantizeConfig,
      'PerRowInt8Quantizer': PerRowInt8Quantizer,
  }


class _IdInputsLayoutTransform(tfmot.quantization.keras.QuantizeLayoutTransform):
  """TF-MOT's default 8-bit layout, minus fake-quantizing the model inputs.

  The inputs are int32 ids; the default scheme would insert a float
  `QuantizeLayer` after every input feeding an annotated layer.
  """

  def apply(self, model, layer_quantize_map):
    for layer in model.layers:
      if isinstance(layer, tf.keras.layers.InputLayer):
        layer_quantize_map.pop(layer.name, None)
    default = tfmot.quantization.keras.default_8bit.Default8BitQuantizeLayoutTransform()
    return default.apply(model, layer_quantize_map)


class _IdInputsScheme(tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme):

  def get_layout_transformer(self):
    return _IdInputsLayoutTransform()


def qat_model(model: tf.keras.Model) -> tf.keras.Model:
  """The QAT (fake-quantized) model of a float model; shares no variables with it."""
  _check_layers(model)
  annotate = tfmot.quantization.keras.quantize_annotate_layer

  def clone(layer):
    fresh = layer.__class__.from_config(layer.get_config())
    if isinstance(layer, base.EmbeddingLookup):
      return annotate(fresh, quantize_config=EmbeddingQuantizeConfig())
    if isinstance(layer, tf.keras.layers.Dense):
      return annotate(fresh)
    return fresh

  annotated = tf.keras.models.clone_model(model, clone_function=clone)
  annotated.set_weights(model.get_weights())
  with tfmot.quantization.keras.quantize_scope(_custom_objects()):
    try:
      return tfmot.quantization.keras.quantize_apply(annotated, scheme=_IdInputsScheme())
    except (ValueError, RuntimeError, TypeError) as e:
      raise UnsupportedModelError(f'TF-MOT cannot quantize model {model.name!r}: {e}') from e


def float_weights_from_qat(qat: tf.keras.Model, template: tf.keras.Model) -> None:
  """Copies the trained float weights of a QAT model into `template` (same layers).

  A `QuantizeWrapperV2` named `quant_<layer>` owns the wrapped layer's
  variables (named `<layer>/<weight>:0`) next to its quantizer variables.
  """
  names = {layer.name for layer in qat.layers}
  for layer in template.layers:
    if not layer.weights:
      continue
    source = qat.get_layer('quant_' + layer.name if 'quant_' + layer.name in names else layer.name)
    by_name = {v.name: v for v in source.weights}
    values = []
    for w in layer.weights:
      key = f'{layer.name}/{w.name.split("/")[-1]}'
      if key not in by_name:
        raise UnsupportedModelError(f'QAT model has no variable {key} (has {sorted(by_name)})')
      values.append(by_name[key].numpy())
    layer.set_weights(values)


@dataclasses.dataclass(frozen=True)
class QatConfig:
  epochs: int = 1
  batch_size: int = 256
  learning_rate: float = 1e-3
  negatives_per_positive: int = 4  # implicit models
  seed: int = 0

  def __post_init__(self):
    if self.epochs <= 0 or self.batch_size <= 0 or not self.learning_rate > 0:
      raise ValueError('QAT epochs, batch_size and learning_rate must be positive')


def qat_finetune(model: tf.keras.Model, task: str, train: ratings_lib.Ratings,
                 config: QatConfig = QatConfig()) -> tuple[tf.keras.Model, list[float]]:
  """Fine-tunes a float model under int8 fake quantization; returns a float copy and losses.

  The returned model has `model`'s layers and the QAT-trained float weights:
  export it with `storage_fn('int8')`.
  """
  from tff_rec.training import model_fns  # pylint: disable=g-import-not-at-top

  qat = qat_model(model)
  qat.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
              loss=model_fns.loss_fn(task)())
  negatives = config.negatives_per_positive if task == base.TASK_IMPLICIT else 0
  losses = []
  for epoch in range(config.epochs):
    ds = centralized.keras_dataset(train, config.batch_size, seed=config.seed + epoch,
                                   negatives_per_positive=negatives)
    losses.append(float(qat.fit(ds, epochs=1, verbose=0).history['loss'][-1]))
  out = tf.keras.models.clone_model(model)
  float_weights_from_qat(qat, out)
  return out, losses
