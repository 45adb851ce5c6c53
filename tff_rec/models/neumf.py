"""Neural collaborative filtering (He et al., WWW 2017): GMF, MLP and NeuMF.

Also `build_ncf_softmax_rating`, the NCF variant of the TF Privacy MovieLens
tutorial (Bu et al., "Deep Learning with Gaussian Differential Privacy"): an
MF branch and an MLP-embedding branch feeding a 5-way softmax over ratings.

Every builder returns a functional Keras model over
`OrderedDict(user=int32[B], item=int32[B])` with a float32[B] output: a logit
for `task='implicit'` (train with BCE from logits), a rating for
`task='rating'` (train with MSE). User embedding tables are the local layers
(one row behind `base.PersonalIndex` when `personal=True`); item tables, MLP
layers and the output head are global. Without `personal` every layer is
global, as in `mf.build_mf`.

Layer names are shared between the builders (`gmf_*`, `mlp_*`), so pretrained
GMF and MLP models initialize NeuMF by name (`load_pretrained_neumf`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_rec.models import base
from tff_rec.models import mf

_TASKS = (base.TASK_IMPLICIT, base.TASK_RATING)

# Seed offsets per role, so a branch is initialized identically in every model.
_SEED_GMF_USER, _SEED_GMF_ITEM, _SEED_MLP_USER, _SEED_MLP_ITEM = 0, 1, 2, 3
_SEED_MLP_DENSE = 10
_SEED_HEAD = 100


def _check_task(task: str) -> None:
  if task not in _TASKS:
    raise ValueError(f'unknown task {task!r}; valid: {", ".join(_TASKS)}')


def _user_index(inputs: dict[str, tf.Tensor], personal: bool) -> tf.Tensor:
  if personal:
    return base.PersonalIndex(name='personal_index')(inputs['user'])
  return inputs['user']


def _embedding(rows: int, dim: int, *, name: str, l2: float,
               initializer: tf.keras.initializers.Initializer) -> base.EmbeddingLookup:
  return base.EmbeddingLookup(rows, dim, l2=l2, name=name, initializer=initializer)


def _normal(stddev: float, seed: int) -> tf.keras.initializers.Initializer:
  return tf.keras.initializers.RandomNormal(stddev=stddev, seed=seed)


class _Parts:
  """Layers collected while building, split into user-side and item-side."""

  def __init__(self):
    self.user_tables: list[tf.keras.layers.Layer] = []
    self.item_tables: list[tf.keras.layers.Layer] = []
    self.other_global: list[tf.keras.layers.Layer] = []

  def rec_model(self, model: tf.keras.Model, task: str, personal: bool,
                affine_in_local: bool = False) -> base.RecModel:
    """The RecModel with the partition conventions of `mf.build_mf`."""
    user_names = [layer.name for layer in self.user_tables]
    item_names = [layer.name for layer in self.item_tables]
    global_layers = self.item_tables + self.other_global
    if personal:
      local_layers, emb_names = list(self.user_tables), item_names
    else:
      global_layers = self.user_tables + global_layers
      local_layers, emb_names = [], user_names + item_names
    return base.RecModel(
        keras_model=model,
        global_layers=global_layers,
        local_layers=local_layers,
        task=task,
        personal=personal,
        embedding_variable_names=tuple(emb_names),
        affine_in_local=affine_in_local,
    )


def _gmf_vector(parts: _Parts, user_index, item, user_rows: int, num_items: int,
                factors: int, l2: float, stddev: float, seed: int) -> tf.Tensor:
  """The GMF branch: elementwise product of user and item embeddings."""
  user_emb = _embedding(user_rows, factors, name='gmf_user_embedding', l2=l2,
                        initializer=_normal(stddev, seed + _SEED_GMF_USER))
  item_emb = _embedding(num_items, factors, name='gmf_item_embedding', l2=l2,
                        initializer=_normal(stddev, seed + _SEED_GMF_ITEM))
  parts.user_tables.append(user_emb)
  parts.item_tables.append(item_emb)
  return tf.keras.layers.Multiply(name='gmf_product')([user_emb(user_index), item_emb(item)])


def _check_layers(layers: Sequence[int]) -> list[int]:
  layers = [int(n) for n in layers]
  if not layers or any(n <= 0 for n in layers):
    raise ValueError(f'layers must be a non-empty list of positive sizes, got {layers}')
  if layers[0] % 2:
    raise ValueError(
        f'layers[0] is the concatenated embedding size and must be even, got {layers[0]}')
  return layers


def _mlp_vector(parts: _Parts, user_index, item, user_rows: int, num_items: int,
                layers: Sequence[int], l2: float, stddev: float, seed: int) -> tf.Tensor:
  """The MLP branch: concatenated embeddings through a ReLU tower."""
  dim = layers[0] // 2
  user_emb = _embedding(user_rows, dim, name='mlp_user_embedding', l2=l2,
                        initializer=_normal(stddev, seed + _SEED_MLP_USER))
  item_emb = _embedding(num_items, dim, name='mlp_item_embedding', l2=l2,
                        initializer=_normal(stddev, seed + _SEED_MLP_ITEM))
  parts.user_tables.append(user_emb)
  parts.item_tables.append(item_emb)
  x = tf.keras.layers.Concatenate(name='mlp_concat')([user_emb(user_index), item_emb(item)])
  for k, units in enumerate(layers[1:]):
    dense = tf.keras.layers.Dense(
        units, activation='relu', name=f'mlp_dense_{k}',
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + _SEED_MLP_DENSE + k))
    parts.other_global.append(dense)
    x = dense(x)
  return x


def _head(parts: _Parts, vector: tf.Tensor, *, name: str, task: str, global_mean: float,
          seed: int) -> tf.Tensor:
  """Dense(1) to a [B] logit, plus a learned global offset for ratings."""
  dense = tf.keras.layers.Dense(
      1, name=name,
      kernel_initializer=tf.keras.initializers.LecunUniform(seed=seed + _SEED_HEAD))
  parts.other_global.append(dense)
  score = base.DropLastAxis(name=f'{name}_flat')(dense(vector))
  if task == base.TASK_RATING:
    bias = mf.GlobalBias(global_mean, name='global_bias')
    parts.other_global.append(bias)
    score = bias(score)
  return score


def build_gmf(
    num_users: int,
    num_items: int,
    *,
    factors: int = 8,
    l2: float = 0.0,
    task: str = base.TASK_IMPLICIT,
    global_mean: float = 0.0,
    personal: bool = False,
    init_stddev: float = 0.01,
    seed: int = 0,
) -> base.RecModel:
  """Generalized MF: Dense(1) over the product of user and item embeddings.

  Args:
    num_users: Rows of the user table(s) (ignored with `personal`).
    num_items: Rows of the item table(s).
    factors: Embedding size.
    l2: L2 on the looked-up embedding rows.
    task: `base.TASK_IMPLICIT` (a logit, logistic loss) or `base.TASK_RATING`
      (a rating, squared loss).
    global_mean: Initial output bias of a rating head.
    personal: One local user row instead of a user table (FedRecon).
    init_stddev: Stddev of the embeddings' normal initializer.
    seed: Initializer seed.

  Returns:
    A `base.RecModel`; with `personal` the user embeddings are its local
    part, otherwise every layer is global.
  """
  _check_task(task)
  inputs = base.model_inputs()
  parts = _Parts()
  user_rows = 1 if personal else num_users
  user_index = _user_index(inputs, personal)
  vector = _gmf_vector(parts, user_index, inputs['item'], user_rows, num_items,
                       factors, l2, init_stddev, seed)
  score = _head(parts, vector, name='gmf_prediction', task=task, global_mean=global_mean,
                seed=seed)
  model = tf.keras.Model(inputs=inputs, outputs=score, name='gmf')
  # The logit w . (p * q) + b is affine in the user row p.
  return parts.rec_model(model, task, personal, affine_in_local=True)


def build_mlp(
    num_users: int,
    num_items: int,
    *,
    layers: Sequence[int] = (64, 32, 16, 8),
    l2: float = 0.0,
    task: str = base.TASK_IMPLICIT,
    global_mean: float = 0.0,
    personal: bool = False,
    init_stddev: float = 0.01,
    seed: int = 0,
) -> base.RecModel:
  """NCF's MLP: embeddings of size layers[0]/2, ReLU layers[1:], Dense(1).

  Args:
    num_users: Rows of the user table(s) (ignored with `personal`).
    num_items: Rows of the item table(s).
    layers: Sizes of the MLP tower; the first is the concatenated embeddings.
    l2: L2 on the looked-up embedding rows.
    task: `base.TASK_IMPLICIT` (a logit, logistic loss) or `base.TASK_RATING`
      (a rating, squared loss).
    global_mean: Initial output bias of a rating head.
    personal: One local user row instead of a user table (FedRecon).
    init_stddev: Stddev of the embeddings' normal initializer.
    seed: Initializer seed.

  Returns:
    A `base.RecModel`; with `personal` the user embeddings are its local
    part, otherwise every layer is global.
  """
  _check_task(task)
  layers = _check_layers(layers)
  inputs = base.model_inputs()
  parts = _Parts()
  user_rows = 1 if personal else num_users
  user_index = _user_index(inputs, personal)
  vector = _mlp_vector(parts, user_index, inputs['item'], user_rows, num_items,
                       layers, l2, init_stddev, seed)
  score = _head(parts, vector, name='mlp_prediction', task=task, global_mean=global_mean,
                seed=seed)
  model = tf.keras.Model(inputs=inputs, outputs=score, name='mlp')
  return parts.rec_model(model, task, personal)


def build_neumf(
    num_users: int,
    num_items: int,
    *,
    factors: int = 8,
    layers: Sequence[int] = (64, 32, 16, 8),
    l2: float = 0.0,
    task: str = base.TASK_IMPLICIT,
    global_mean: float = 0.0,
    personal: bool = False,
    init_stddev: float = 0.01,
    seed: int = 0,
) -> base.RecModel:
  """NeuMF: Dense(1) over concat(GMF vector, last MLP layer).

  Args:
    num_users: Rows of the user table(s) (ignored with `personal`).
    num_items: Rows of the item table(s).
    factors: GMF embedding size.
    layers: Sizes of the MLP tower; the first is the concatenated embeddings.
    l2: L2 on the looked-up embedding rows.
    task: `base.TASK_IMPLICIT` (a logit, logistic loss) or `base.TASK_RATING`
      (a rating, squared loss).
    global_mean: Initial output bias of a rating head.
    personal: One local user row instead of a user table (FedRecon).
    init_stddev: Stddev of the embeddings' normal initializer.
    seed: Initializer seed.

  Returns:
    A `base.RecModel`; with `personal` the user embeddings are its local
    part, otherwise every layer is global.
  """
  _check_task(task)
  layers = _check_layers(layers)
  inputs = base.model_inputs()
  parts = _Parts()
  user_rows = 1 if personal else num_users
  user_index = _user_index(inputs, personal)
  gmf_vec = _gmf_vector(parts, user_index, inputs['item'], user_rows, num_items,
                        factors, l2, init_stddev, seed)
  mlp_vec = _mlp_vector(parts, user_index, inputs['item'], user_rows, num_items,
                        layers, l2, init_stddev, seed)
  vector = tf.keras.layers.Concatenate(name='neumf_concat')([gmf_vec, mlp_vec])
  score = _head(parts, vector, name='prediction', task=task, global_mean=global_mean,
                seed=seed)
  model = tf.keras.Model(inputs=inputs, outputs=score, name='neumf')
  return parts.rec_model(model, task, personal)


def load_pretrained_neumf(neumf: base.RecModel, gmf: base.RecModel, mlp: base.RecModel,
                          alpha: float = 0.5) -> None:
  """Initializes NeuMF from trained GMF and MLP models, as in the NCF paper.

  Embeddings and MLP layers are copied by name; the output layer becomes
  `[alpha * h_gmf; (1 - alpha) * h_mlp]` with bias `alpha * b_gmf +
  (1 - alpha) * b_mlp` (the NCF code's 0.5 / 0.5 at the default). All three
  models must have the same sizes, task and `personal` setting.
  """
  target = neumf.keras_model
  for source in (gmf.keras_model, mlp.keras_model):
    for layer in source.layers:
      if layer.weights and layer.name not in ('gmf_prediction', 'mlp_prediction', 'global_bias'):
        target.get_layer(layer.name).set_weights(layer.get_weights())
  g_kernel, g_bias = gmf.keras_model.get_layer('gmf_prediction').get_weights()
  m_kernel, m_bias = mlp.keras_model.get_layer('mlp_prediction').get_weights()
  target.get_layer('prediction').set_weights([
      np.concatenate([alpha * g_kernel, (1.0 - alpha) * m_kernel], axis=0),
      alpha * g_bias + (1.0 - alpha) * m_bias,
  ])
  if neumf.task == base.TASK_RATING:
    g_mean = gmf.keras_model.get_layer('global_bias').get_weights()[0]
    m_mean = mlp.keras_model.get_layer('global_bias').get_weights()[0]
    target.get_layer('global_bias').set_weights([alpha * g_mean + (1.0 - alpha) * m_mean])


class ExpectedRating(tf.keras.layers.Layer):
  """Expected rating under softmax(logits) over fixed rating values: [B, L] -> [B]."""

  def __init__(self, rating_values: Sequence[float], **kwargs):
    super().__init__(**kwargs)
    self.rating_values = tuple(float(v) for v in rating_values)

  def call(self, logits):
    values = tf.constant(self.rating_values, dtype=logits.dtype)
    return tf.linalg.matvec(tf.nn.softmax(logits, axis=-1), values)

  def get_config(self):
    config = super().get_config()
    config.update(rating_values=self.rating_values)
    return config


def build_ncf_softmax_rating(
    num_users: int,
    num_items: int,
    *,
    mf_dim: int = 5,
    mlp_dim: int = 10,
    rating_values: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 5.0),
    l2: float = 0.0,
    personal: bool = False,
    init_scale: float = 0.05,
    seed: int = 0,
) -> base.RecModel:
  """The TF Privacy MovieLens tutorial's NCF: softmax over ratings, output E[rating].

  concat(MF product of dim `mf_dim`, concatenated MLP embeddings of dim
  `mlp_dim` each) -> Dense(len(rating_values)) logits (layer
  `rating_logits`) -> the model output, the expected rating
  `sum_l softmax(logits)_l * rating_values[l]` as float32[B] (task
  'rating'). Through TFF's Keras wrappers this output is trained with MSE;
  the tutorial's objective (softmax cross-entropy on the rating class) needs
  the logits: use `rating_logits_model` and `rating_to_class`.
  Embeddings start uniform in [-init_scale, init_scale] (Keras' default).

  Args:
    num_users: Rows of the user tables (ignored with `personal`).
    num_items: Rows of the item tables.
    mf_dim: Size of the MF embeddings.
    mlp_dim: Size of each MLP embedding.
    rating_values: The rating classes, in order.
    l2: L2 on the looked-up embedding rows.
    personal: One local user row instead of user tables (FedRecon).
    init_scale: Half-width of the uniform initializer.
    seed: Initializer seed.

  Returns:
    A `base.RecModel` whose output is the expected rating.

  Raises:
    ValueError: Fewer than two rating values.
  """
  if len(rating_values) < 2:
    raise ValueError(f'rating_values needs at least 2 values, got {rating_values}')
  inputs = base.model_inputs()
  parts = _Parts()
  user_rows = 1 if personal else num_users
  user_index = _user_index(inputs, personal)

  def uniform(offset: int):
    return tf.keras.initializers.RandomUniform(-init_scale, init_scale, seed=seed + offset)

  tables = {}
  for name, rows, dim, offset in (
      ('mf_user_embedding', user_rows, mf_dim, _SEED_GMF_USER),
      ('mf_item_embedding', num_items, mf_dim, _SEED_GMF_ITEM),
      ('mlp_user_embedding', user_rows, mlp_dim, _SEED_MLP_USER),
      ('mlp_item_embedding', num_items, mlp_dim, _SEED_MLP_ITEM),
  ):
    tables[name] = _embedding(rows, dim, name=name, l2=l2, initializer=uniform(offset))
    (parts.user_tables if 'user' in name else parts.item_tables).append(tables[name])
  mf_vec = tf.keras.layers.Multiply(name='mf_product')(
      [tables['mf_user_embedding'](user_index), tables['mf_item_embedding'](inputs['item'])])
  mlp_vec = tf.keras.layers.Concatenate(name='mlp_concat')(
      [tables['mlp_user_embedding'](user_index), tables['mlp_item_embedding'](inputs['item'])])
  vector = tf.keras.layers.Concatenate(name='ncf_concat')([mf_vec, mlp_vec])
  logits_layer = tf.keras.layers.Dense(
      len(rating_values), name='rating_logits',
      kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + _SEED_HEAD))
  parts.other_global.append(logits_layer)
  rating = ExpectedRating(rating_values, name='expected_rating')(logits_layer(vector))
  model = tf.keras.Model(inputs=inputs, outputs=rating, name='ncf_softmax')
  return parts.rec_model(model, base.TASK_RATING, personal)


def rating_logits_model(model: base.RecModel | tf.keras.Model) -> tf.keras.Model:
  """The [B, L] rating-logits submodel of an NCF-softmax model (shared weights)."""
  keras_model = model.keras_model if isinstance(model, base.RecModel) else model
  inputs = {name: keras_model.get_layer(name).output for name in ('user', 'item')}
  return tf.keras.Model(inputs=inputs, outputs=keras_model.get_layer('rating_logits').output,
                        name='ncf_softmax_logits')


def rating_to_class(ratings: tf.Tensor,
                    rating_values: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 5.0)
                    ) -> tf.Tensor:
  """Class index (int32) of the nearest rating value, for softmax cross-entropy."""
  values = tf.constant(rating_values, tf.float32)
  diff = tf.abs(tf.expand_dims(tf.cast(ratings, tf.float32), -1) - values)
  return tf.argmin(diff, axis=-1, output_type=tf.int32)
