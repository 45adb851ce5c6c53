"""What every recommender here provides: a Keras model split into global and local parts.

Global (item-side) variables are shared and aggregated on the server. Local
(user-side) variables belong to one user: in Federated Reconstruction they
never leave the device and are rebuilt there each round.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

TASK_RATING = 'rating'  # explicit ratings, regression
TASK_IMPLICIT = 'implicit'  # 0/1 interactions, a score (logit) per pair


@dataclasses.dataclass(frozen=True)
class RecModel:
  """A built Keras recommender and its global/local layer partition.

  `keras_model` maps `OrderedDict(user=int32[B], item=int32[B])` to a
  prediction `float32[B]` (a rating for `TASK_RATING`, a logit for
  `TASK_IMPLICIT`). In the `personal` variant the user-side layers hold a
  single row (the one user on a device) and the `user` input is ignored.
  """

  keras_model: tf.keras.Model
  global_layers: Sequence[tf.keras.layers.Layer]
  local_layers: Sequence[tf.keras.layers.Layer]
  task: str
  personal: bool
  # Names of (trainable) global embedding-table variables: only the rows a
  # client used receive updates.
  embedding_variable_names: Sequence[str] = ()
  # Whether the prediction is affine in the local (user-side) variables once
  # the global ones are fixed (biased MF; GMF). With a squared loss the
  # reconstruction of the local part is then a ridge regression with a
  # closed-form solution (tff_rec.training.fed_recon).
  affine_in_local: bool = False

  @property
  def global_variables(self) -> list[tf.Variable]:
    return [v for layer in self.global_layers for v in layer.variables]

  @property
  def local_variables(self) -> list[tf.Variable]:
    return [v for layer in self.local_layers for v in layer.variables]


# model builder: (num_users, num_items, personal) -> RecModel
ModelBuilder = Callable[..., RecModel]


def model_inputs() -> dict[str, tf.keras.Input]:
  """The Keras inputs shared by every model: int32 user and item indices."""
  return {
      'user': tf.keras.Input(shape=(), dtype=tf.int32, name='user'),
      'item': tf.keras.Input(shape=(), dtype=tf.int32, name='item'),
  }


def _row_l2(rows: tf.Tensor, l2: float) -> tf.Tensor:
  """Identity whose gradient adds that of `l2 * sum(rows**2) / batch_size`."""

  @tf.custom_gradient
  def fn(x):
    def grad(dy):
      batch = tf.cast(tf.maximum(tf.shape(x)[0], 1), x.dtype)
      return dy + (2.0 * l2 / batch) * x

    return tf.identity(x), grad

  return fn(rows)


class EmbeddingLookup(tf.keras.layers.Layer):
  """An embedding table with L2 on the rows looked up in each batch.

  Keras' `embeddings_regularizer` penalizes the whole table every step, which
  moves every row (so every client's update would touch every row), and
  input-dependent `add_loss` terms are dropped by TFF's Keras wrappers. Here
  the per-example MF penalty `l2 * sum(rows**2) / batch_size` enters through
  the gradient of the lookup, so it applies under Keras `fit`, TFF FedAvg and
  FedRecon, and per-example DP-SGD alike. Reported losses exclude it.
  """

  def __init__(self, input_dim: int, output_dim: int, l2: float = 0.0,
               initializer='zeros', **kwargs):
    super().__init__(**kwargs)
    self.input_dim = int(input_dim)
    self.output_dim = int(output_dim)
    self.l2 = float(l2)
    self.initializer = tf.keras.initializers.get(initializer)
    self.mask = None

  def set_mask(self, mask) -> None:
    """Fixes a 0/1 sparsity pattern: looked-up rows are multiplied by it.

    Masked entries then get no gradient (L2 included) and do not affect the
    output, whatever value they hold (e.g. after DP noise on the server), so
    a pruned table keeps its pattern while it is fine-tuned by FedAvg or
    FedRecon. The mask is a graph constant, not a variable: it is neither
    broadcast nor aggregated. `None` removes it.
    """
    if mask is None:
      self.mask = None
      return
    mask = np.asarray(mask)
    if mask.shape != (self.input_dim, self.output_dim):
      raise ValueError(f'{self.name}: mask shape {mask.shape} != table shape '
                       f'{(self.input_dim, self.output_dim)}')
    if not np.isin(mask, (0, 1)).all():
      raise ValueError(f'{self.name}: a mask holds only 0 and 1')
    self.mask = mask.astype(np.uint8)

  def build(self, input_shape):
    self.embeddings = self.add_weight(
        name='embeddings',
        shape=(self.input_dim, self.output_dim),
        initializer=self.initializer,
        trainable=True,
    )
    super().build(input_shape)

  def call(self, ids):
    rows = tf.nn.embedding_lookup(self.embeddings, ids)
    if self.mask is not None:
      rows = rows * tf.cast(tf.gather(tf.constant(self.mask), ids), rows.dtype)
    if self.l2:
      rows = _row_l2(rows, self.l2)
    return rows

  def get_prunable_weights(self):
    """The table, for TF-MOT's `prune_low_magnitude` (its PrunableLayer protocol)."""
    return [self.embeddings]

  def get_config(self):
    config = super().get_config()
    config.update(input_dim=self.input_dim, output_dim=self.output_dim, l2=self.l2,
                  initializer=tf.keras.initializers.serialize(self.initializer))
    return config


class DropLastAxis(tf.keras.layers.Layer):
  """[B, 1] -> [B]: one graph op (a Keras `Reshape` costs about seven in a SavedModel)."""

  def call(self, x):
    return tf.squeeze(x, axis=-1)


class PersonalIndex(tf.keras.layers.Layer):
  """Maps any user index to row 0: the single on-device user row."""

  def call(self, user):
    return tf.zeros_like(user)
