"""Export of a trained recommender as a TF Serving SavedModel.

Layout (what TF Serving's `--model_config_file` expects):

  <export_base>/models.config            ModelServerConfig text proto, one
                                         entry per model name (base_path)
  <export_base>/<model_name>/<version>/  saved_model.pb, variables/,
                                         assets.extra/tf_serving_warmup_requests

The SavedModel is a plain `tf.Module` (no Keras metadata); raw ids are
strings mapped to dense indices (and back) in the graph (`id_maps`): integer
ids as runs of consecutive ids in small variables, other ids by hash tables
read from `assets/user_ids.txt` and `assets/item_ids.txt`. Signatures:

* models with a server-side user table (`user_embedding` 'table'; 'shared'
  models have one user row for everybody):
  - `serving_default(user_id: string[B], item_id: string[B])` ->
    `prediction: float32[B]` (a rating clipped to the rating scale, or the
    logit of an implicit model, which also gets `probability`) and
    `cold_start: bool[B]` (a fallback was used);
  - `recommend(user_id: string[B], k: int32[])` -> `item_ids: string[B, k]`,
    `scores: float32[B, k]` (unclipped scores, best first), `cold_start`.
    With `exclude_seen` the user's training items are never recommended
    (they score -inf; when k exceeds the unseen items, the tail has -inf).
* Federated Reconstruction models (`user_embedding` 'local', MF only): the
  server holds no user embedding, so the user is described by their history.
  - `recommend_from_history(history_item_id: string[H], history_rating:
    float32[H], k: int32[])` -> `item_ids: string[k]`, `scores: float32[k]`;
  - `serving_default(history_item_id, history_rating, item_id: string[C])`
    -> `prediction: float32[C]`, `cold_start: bool[C]`.
  The user row `[p_u; b_u]` is rebuilt in the graph by closed-form ridge
  regression with the item factors frozen:
  `argmin mean_h (r_h - mu - b_i - b_u - p_u.q_i)^2 + l2 (|p_u|^2 + b_u^2)`,
  i.e. `(X'X + l2 * max(H, 1) I) w = X'(r - mu - b_i)` with rows
  `X_h = [q_i, 1]`, solved by Cholesky. This is the exact minimizer of the
  per-user objective FedRecon's reconstruction descends (MSE plus the models'
  row L2), in one small (d+1)x(d+1) solve instead of a few SGD steps, so it is
  deterministic and fast. `l2` is `ExportOptions.recon_l2` (default: the
  model's `l2` hyperparameter, or 0.1 when that is 0). An empty history gives
  p_u = 0, b_u = 0 (the cold-start prediction mu + b_i).

Unknown ids (`unknown_user`, `unknown_item`, fixed at export time):
* 'error': a `tf.debugging.Assert` fails the request (InvalidArgument in TF
  Serving, naming the unknown ids);
* 'cold_start': an unknown user gets an extra user row, the zero row for MF
  (prediction mu + b_i: item-bias-only, i.e. the global mean plus item
  popularity) and the mean user row for the other models; an unknown item
  likewise gets the zero (MF: mu + b_u) or mean item row. For FedRecon, unknown
  history items are left out of the reconstruction.

Exports are written to a temporary sibling directory (its name is not a
number, so TF Serving ignores it) and renamed into place; a failed export
leaves no version directory behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Mapping, Optional

from absl import logging
from google.protobuf import text_format
import numpy as np
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from tff_rec import atomic
from tff_rec.data import ratings as ratings_lib
from tff_rec.export import id_maps
from tff_rec.export import warmup
from tff_rec.models import base
from tff_rec.models import predictions
from tff_rec.models import registry

SERVING_DEFAULT = 'serving_default'
RECOMMEND = 'recommend'
RECOMMEND_FROM_HISTORY = 'recommend_from_history'
MODELS_CONFIG = 'models.config'
UNKNOWN_POLICIES = ('error', 'cold_start')
# Models each `user_embedding` variant can export.
SUPPORTED_MODELS: Mapping[str, tuple[str, ...]] = {
    'table': tuple(registry.MODEL_NAMES),
    'shared': tuple(registry.MODEL_NAMES),
    'local': ('mf',),
}
DEFAULT_RECON_L2 = 0.1


class ExportError(ValueError):
  """An export that cannot be done as asked (unsupported model, existing version, ...)."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  """Export-time choices.

  Attributes:
    exclude_seen: `recommend` never returns a user's training items (the
      training pairs are stored in the SavedModel as a ragged matrix); for
      FedRecon, `recommend_from_history` skips the history items.
    unknown_user, unknown_item: 'error' or 'cold_start' (module docstring).
    recon_l2: FedRecon ridge strength (None: the model's l2, or 0.1).
    warmup: write `assets.extra/tf_serving_warmup_requests`.
    warmup_k: the k of the warmup `recommend` requests.
  """

  exclude_seen: bool = False
  unknown_user: str = 'error'
  unknown_item: str = 'error'
  recon_l2: Optional[float] = None
  warmup: bool = True
  warmup_k: int = 10

  def __post_init__(self):
    for name in ('unknown_user', 'unknown_item'):
      if getattr(self, name) not in UNKNOWN_POLICIES:
        raise ExportError(f'{name} must be one of {list(UNKNOWN_POLICIES)}, got {getattr(self, name)!r}')
    if self.recon_l2 is not None and not self.recon_l2 > 0:
      raise ExportError(f'recon_l2 must be positive, got {self.recon_l2}')
    if self.warmup_k <= 0:
      raise ExportError(f'warmup_k must be positive, got {self.warmup_k}')


@dataclasses.dataclass(frozen=True)
class ExportResult:
  version_dir: str
  signatures: tuple[str, ...]
  models_config: str
  warmup_file: Optional[str]


# ---------------------------------------------------------------------------
# Checks.


def check_supported(model_config: Mapping) -> str:
  """The run's `user_embedding` variant; ExportError if it cannot be exported."""
  for key in ('model', 'user_embedding', 'num_users', 'num_items', 'task', 'hparams'):
    if key not in model_config:
      raise ExportError(f'model config lacks {key!r}')
  variant, name = model_config['user_embedding'], model_config['model']
  if variant not in SUPPORTED_MODELS:
    raise ExportError(f'unknown user_embedding {variant!r}; valid: {", ".join(SUPPORTED_MODELS)}')
  if name not in SUPPORTED_MODELS[variant]:
    supported = '; '.join(f'{v}: {", ".join(m)}' for v, m in SUPPORTED_MODELS.items())
    raise ExportError(
        f'cannot export model {name!r} with user_embedding={variant!r}: the on-device '
        f'reconstruction signature is closed-form ridge for MF only. Supported: {supported}')
  return variant


def check_finite(keras_model: tf.keras.Model) -> None:
  """ExportError naming the first weight with a NaN or an infinity (nothing is exported)."""
  for weight in keras_model.weights:
    value = np.asarray(weight.numpy())
    if not np.all(np.isfinite(value)):
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      raise ExportError(f'refusing to export a model with non-finite weights: {weight.name} has '
                        f'{bad} NaN/infinite values of {value.size}')


def check_version(export_base: str, model_name: str, version: int, overwrite: bool = False) -> str:
  """The version directory to write; ExportError for bad names or an existing version."""
  if not model_name or '/' in model_name or model_name.startswith('.') or model_name != model_name.strip():
    raise ExportError(f'invalid model name {model_name!r}')
  if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version <= 0:
    raise ExportError(f'version must be a positive integer (TF Serving version), got {version!r}')
  path = os.path.join(export_base, model_name, str(int(version)))
  if os.path.exists(path) and not overwrite:
    raise ExportError(f'{path} already exists; pass overwrite=True (--overwrite) to replace it')
  return path


# ---------------------------------------------------------------------------
# The scoring model with cold-start rows.


def _tables(keras_model: tf.keras.Model, side: str) -> list[tf.keras.layers.Layer]:
  """Embedding-table layers of one side ('user' or 'item'), by layer name."""
  return [layer for layer in keras_model.layers
          if hasattr(layer, 'input_dim') and side in layer.name.split('_')]


def with_cold_start_rows(keras_model: tf.keras.Model, model_config: Mapping, *,
                         users: bool, items: bool) -> tf.keras.Model:
  """A float copy of a run's model for serving, with one extra row per user / item table.

  The extra row is the fallback of unknown ids: zeros for MF, the mean row
  otherwise. Personal models keep their single user row. The copy is built
  with `l2=0` (the training-only row penalty is an identity in the forward
  pass; without it the graph carries no custom-gradient functions).
  """
  personal = model_config['user_embedding'] != 'table'
  users = users and not personal
  num_users = model_config['num_users'] + (1 if users else 0)
  num_items = model_config['num_items'] + (1 if items else 0)
  hparams = dict(model_config['hparams'])
  if 'l2' in registry.hparam_names(model_config['model']):
    hparams['l2'] = 0.0
  rec = registry.build_model(model_config['model'], num_users, num_items, personal=personal,
                             seed=model_config.get('seed', 0), **hparams)
  zero = model_config['model'] == 'mf'
  grow = set()
  if users:
    grow |= {layer.name for layer in _tables(rec.keras_model, 'user')}
  if items:
    grow |= {layer.name for layer in _tables(rec.keras_model, 'item')}
  for layer in rec.keras_model.layers:
    if not layer.weights:
      continue
    values = keras_model.get_layer(layer.name).get_weights()
    if layer.name in grow:
      (table,) = values
      extra = np.zeros_like(table[:1]) if zero else table.mean(axis=0, keepdims=True)
      values = [np.concatenate([table, extra], axis=0)]
    layer.set_weights(values)
  return rec.keras_model


def _full_table(layer) -> tf.Tensor:
  """The float32 table of an embedding layer (dequantized if stored compressed)."""
  if hasattr(layer, 'full_table'):
    return layer.full_table()
  return tf.convert_to_tensor(layer.embeddings)


# ---------------------------------------------------------------------------
# Serving modules.


def _lookup(id_map, ids, policy: str, fallback: int, what: str):
  """Dense indices of raw ids under the unknown-id policy, and which were known."""
  idx = id_map.index_of(ids)
  known = idx >= 0
  if policy == 'error':
    unknown = tf.gather(ids, tf.reshape(tf.where(tf.logical_not(known)), [-1]))
    check = tf.debugging.Assert(tf.reduce_all(known), [f'unknown {what}(s):', unknown], summarize=20)
    with tf.control_dependencies([check]):
      idx = tf.identity(idx)
  else:
    idx = tf.where(known, idx, tf.constant(fallback, idx.dtype))
  return tf.cast(idx, tf.int32), known


class _Functions:
  """Holds the signature functions out of TF's object tracking (saved once, as signatures)."""

  def __init__(self, **functions):
    self.__dict__.update(functions)


def _named(variables) -> dict:
  """Variables keyed by their names (readable checkpoint keys, e.g. item_embedding.quantized)."""
  return {v.name.split(':')[0].replace('/', '.'): v for v in variables}


def _positive_k(k, n: int):
  check = tf.debugging.Assert(k > 0, ['k must be positive, got', k])
  with tf.control_dependencies([check]):
    return tf.minimum(k, n)


class _TableServing(tf.Module):
  """Signatures of models whose user rows live on the server."""

  def __init__(self, model: tf.keras.Model, model_config: Mapping, user_ids, item_ids,
               options: ExportOptions, seen: Optional[ratings_lib.Ratings], id_dir: str):
    super().__init__(name='recommender')
    self.model_variables = _named(model.variables)
    score = lambda users, items: model({'user': users, 'item': items}, training=False)
    self.users = id_maps.build(user_ids, os.path.join(id_dir, 'user_ids.txt'))
    self.items = id_maps.build(item_ids, os.path.join(id_dir, 'item_ids.txt'))
    num_users, num_items = len(user_ids), len(item_ids)
    personal = model_config['user_embedding'] != 'table'
    user_fallback = 0 if personal else num_users
    rating = model_config['task'] == base.TASK_RATING
    low, high = (model_config.get('rating_scale') or (1.0, 5.0))[:2]
    if options.exclude_seen:
      order = np.lexsort((seen.items, seen.users))
      counts = np.bincount(seen.users, minlength=num_users + 1)
      splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
      self.seen_splits = tf.Variable(splits, trainable=False, name='seen_row_splits')
      self.seen_items = tf.Variable(seen.items[order].astype(np.int32), trainable=False,
                                    name='seen_items')

    def lookup_users(user_id):
      return _lookup(self.users, user_id, options.unknown_user, user_fallback, 'user_id')

    def predict(user_id, item_id):
      shape_check = tf.debugging.Assert(
          tf.equal(tf.size(user_id), tf.size(item_id)),
          ['user_id and item_id must have the same length, got', tf.size(user_id), tf.size(item_id)])
      with tf.control_dependencies([shape_check]):
        users, known_users = lookup_users(user_id)
      items, known_items = _lookup(self.items, item_id, options.unknown_item, num_items, 'item_id')
      s = score(users, items)
      out = {'prediction': predictions.clip_to_scale(s, (low, high)) if rating else s,
             'cold_start': tf.logical_not(tf.logical_and(known_users, known_items))}
      if not rating:
        out['probability'] = tf.sigmoid(s)
      return out

    def recommend(user_id, k):
      users, known = lookup_users(user_id)
      batch = tf.shape(users)[0]
      scores = tf.reshape(
          score(tf.reshape(tf.tile(users[:, None], [1, num_items]), [-1]),
                tf.tile(tf.range(num_items, dtype=tf.int32), [batch])),
          [batch, num_items])
      if options.exclude_seen:
        starts = tf.gather(self.seen_splits, users)
        ends = tf.gather(self.seen_splits, users + 1)
        rows = tf.repeat(tf.range(batch), tf.cast(ends - starts, tf.int32))
        seen_items = tf.gather(self.seen_items, tf.ragged.range(starts, ends).flat_values)
        scores = tf.tensor_scatter_nd_update(
            scores, tf.stack([rows, seen_items], axis=1),
            tf.fill(tf.shape(seen_items), tf.constant(-np.inf, scores.dtype)))
      top = tf.math.top_k(scores, _positive_k(k, num_items))
      return {'item_ids': self.items.id_of(top.indices),
              'scores': top.values, 'cold_start': tf.logical_not(known)}

    self.functions = _Functions(
        predict=tf.function(predict, input_signature=[
            tf.TensorSpec([None], tf.string, name='user_id'),
            tf.TensorSpec([None], tf.string, name='item_id')]),
        recommend=tf.function(recommend, input_signature=[
            tf.TensorSpec([None], tf.string, name='user_id'), tf.TensorSpec([], tf.int32, name='k')]))

  def signatures(self) -> dict:
    return {SERVING_DEFAULT: self.functions.predict.get_concrete_function(),
            RECOMMEND: self.functions.recommend.get_concrete_function()}


class _ReconServing(tf.Module):
  """FedRecon MF: the user row is rebuilt from the request's history."""

  def __init__(self, model: tf.keras.Model, model_config: Mapping, item_ids,
               options: ExportOptions, id_dir: str):
    super().__init__(name='recommender')
    names = {layer.name for layer in model.layers}
    item_layer = model.get_layer('item_embedding')
    bias_layer = model.get_layer('item_bias') if 'item_bias' in names else None
    mean_layer = model.get_layer('global_bias') if 'global_bias' in names else None
    used = [item_layer] + [x for x in (bias_layer, mean_layer) if x is not None]
    self.model_variables = _named([v for layer in used for v in layer.variables])
    self.items = id_maps.build(item_ids, os.path.join(id_dir, 'item_ids.txt'))
    num_items = len(item_ids)
    has_bias = bias_layer is not None
    l2 = options.recon_l2 or float(model_config['hparams'].get('l2') or 0.0) or DEFAULT_RECON_L2
    low, high = (float(x) for x in (model_config.get('rating_scale') or (1.0, 5.0))[:2])

    def weights():
      q = _full_table(item_layer)
      b = tf.reshape(_full_table(bias_layer), [-1]) if has_bias else tf.zeros([tf.shape(q)[0]])
      mu = tf.convert_to_tensor(mean_layer.bias) if mean_layer is not None else tf.constant(0.0)
      return q, b, mu

    def reconstruct(history_item_id, history_rating):
      """(p_u, b_u, history indices, known history mask)."""
      scale = f'history_rating must be numbers within the rating scale [{low:g}, {high:g}]'
      checks = [
          tf.debugging.assert_equal(
              tf.shape(history_item_id), tf.shape(history_rating),
              message='history_item_id and history_rating must have the same length'),
          # NaN fails both comparisons, so it is refused too.
          tf.debugging.assert_greater_equal(history_rating, tf.constant(low, tf.float32),
                                            message=scale),
          tf.debugging.assert_less_equal(history_rating, tf.constant(high, tf.float32),
                                         message=scale),
      ]
      with tf.control_dependencies(checks):
        idx, known = _lookup(self.items, history_item_id, options.unknown_item, 0,
                             'history item_id')
      q, b, mu = weights()
      x = tf.gather(q, idx)
      y = history_rating - mu - tf.gather(b, idx)
      if has_bias:
        x = tf.concat([x, tf.ones_like(x[:, :1])], axis=1)
      w = tf.cast(known, tf.float32)
      xw = x * w[:, None]
      dim = tf.shape(x)[1]
      lam = l2 * tf.maximum(tf.reduce_sum(w), 1.0)
      a = tf.matmul(xw, x, transpose_a=True) + lam * tf.eye(dim)
      rhs = tf.matmul(xw, y[:, None], transpose_a=True)
      sol = tf.linalg.cholesky_solve(tf.linalg.cholesky(a), rhs)[:, 0]
      if has_bias:
        return sol[:-1], sol[-1], idx, known
      return sol, tf.constant(0.0), idx, known

    def predict(history_item_id, history_rating, item_id):
      p, bu, _, _ = reconstruct(history_item_id, history_rating)
      items, known = _lookup(self.items, item_id, options.unknown_item, num_items, 'item_id')
      q, b, mu = weights()
      s = tf.linalg.matvec(tf.gather(q, items), p) + tf.gather(b, items) + mu + bu
      return {'prediction': predictions.clip_to_scale(s, (low, high)),
              'cold_start': tf.logical_not(known)}

    def recommend_from_history(history_item_id, history_rating, k):
      p, bu, idx, known = reconstruct(history_item_id, history_rating)
      q, b, mu = weights()
      scores = tf.linalg.matvec(q[:num_items], p) + b[:num_items] + mu + bu
      if options.exclude_seen:
        seen = tf.boolean_mask(idx, known)
        scores = tf.tensor_scatter_nd_update(
            scores, seen[:, None], tf.fill(tf.shape(seen), tf.constant(-np.inf, scores.dtype)))
      top = tf.math.top_k(scores, _positive_k(k, num_items))
      return {'item_ids': self.items.id_of(top.indices),
              'scores': top.values}

    history = [tf.TensorSpec([None], tf.string, name='history_item_id'),
               tf.TensorSpec([None], tf.float32, name='history_rating')]
    self.functions = _Functions(
        predict=tf.function(predict, input_signature=history + [
            tf.TensorSpec([None], tf.string, name='item_id')]),
        recommend_from_history=tf.function(recommend_from_history, input_signature=history + [
            tf.TensorSpec([], tf.int32, name='k')]))

  def signatures(self) -> dict:
    return {SERVING_DEFAULT: self.functions.predict.get_concrete_function(),
            RECOMMEND_FROM_HISTORY: self.functions.recommend_from_history.get_concrete_function()}


# ---------------------------------------------------------------------------
# Warmup requests.


def warmup_requests(model_name: str, model_config: Mapping, user_ids, item_ids,
                    options: ExportOptions) -> list:
  """One PredictionLog per signature, with known ids."""
  users = np.array([str(u).encode() for u in list(user_ids)[:2]], dtype=object)
  items = np.array([str(i).encode() for i in list(item_ids)[:2]], dtype=object)
  k = np.int32(min(options.warmup_k, len(item_ids)))
  if model_config['user_embedding'] == 'local':
    low, high = (model_config.get('rating_scale') or (1.0, 5.0))[:2]
    history = np.array([str(i).encode() for i in list(item_ids)[:3]], dtype=object)
    ratings = np.full(len(history), (low + high) / 2.0, np.float32)
    return [
        warmup.predict_log(model_name, SERVING_DEFAULT, {
            'history_item_id': history, 'history_rating': ratings, 'item_id': items}),
        warmup.predict_log(model_name, RECOMMEND_FROM_HISTORY, {
            'history_item_id': history, 'history_rating': ratings, 'k': k}),
    ]
  n = min(len(users), len(items))
  return [
      warmup.predict_log(model_name, SERVING_DEFAULT, {'user_id': users[:n], 'item_id': items[:n]}),
      warmup.predict_log(model_name, RECOMMEND, {'user_id': users, 'k': k}),
  ]


# ---------------------------------------------------------------------------
# models.config


def write_models_config(export_base: str, model_name: str) -> str:
  """Adds/updates `model_name` in `<export_base>/models.config` (atomically)."""
  path = os.path.join(export_base, MODELS_CONFIG)
  config = model_server_config_pb2.ModelServerConfig()
  if os.path.exists(path):
    with open(path) as f:
      try:
        text_format.Parse(f.read(), config)
      except text_format.ParseError as e:
        raise ExportError(f'{path}: not a ModelServerConfig text proto: {e}') from None
  entries = config.model_config_list.config
  base_path = os.path.abspath(os.path.join(export_base, model_name))
  for entry in entries:
    if entry.name == model_name:
      entry.base_path = base_path
      entry.model_platform = 'tensorflow'
      break
  else:
    entries.add(name=model_name, base_path=base_path, model_platform='tensorflow')
  return atomic.write(path, text_format.MessageToString(config))


def read_models_config(path: str) -> model_server_config_pb2.ModelServerConfig:
  config = model_server_config_pb2.ModelServerConfig()
  with open(path) as f:
    text_format.Parse(f.read(), config)
  return config


# ---------------------------------------------------------------------------
# Export.


def build_serving_model(
    keras_model: tf.keras.Model,
    model_config: Mapping,
    options: ExportOptions,
    storage_fn: Optional[Callable[[tf.keras.Model], tf.keras.Model]] = None,
) -> tf.keras.Model:
  """The scoring model as exported.

  Args:
    keras_model: The trained scoring model.
    model_config: Its `model_config.json` record.
    options: The export options (unknown-id policies).
    storage_fn: Turns the model into its stored form (e.g. int8), if given.

  Returns:
    The model with cold-start rows added where the policies ask for them,
    then `storage_fn` applied.
  """
  model = with_cold_start_rows(keras_model, model_config,
                               users=options.unknown_user == 'cold_start',
                               items=options.unknown_item == 'cold_start')
  return storage_fn(model) if storage_fn is not None else model


def _check_catalog(model_config, user_index, item_index, seen) -> None:
  if len(user_index) != model_config['num_users'] or len(item_index) != model_config['num_items']:
    raise ExportError(
        f'id maps have {len(user_index)} users / {len(item_index)} items but the model was '
        f'trained on {model_config["num_users"]} / {model_config["num_items"]}')
  if seen is not None and (seen.num_users != len(user_index) or seen.num_items != len(item_index)):
    raise ExportError('the seen ratings use a different catalog than the model')


def export(
    keras_model: tf.keras.Model,
    model_config: Mapping,
    user_index: ratings_lib.IdIndex,
    item_index: ratings_lib.IdIndex,
    export_base: str,
    model_name: str,
    version: int,
    options: ExportOptions = ExportOptions(),
    *,
    seen: Optional[ratings_lib.Ratings] = None,
    storage_fn: Optional[Callable[[tf.keras.Model], tf.keras.Model]] = None,
    overwrite: bool = False,
) -> ExportResult:
  """Exports a trained float Keras model (a run's final model) for TF Serving.

  Args:
    keras_model: the run's model (`load_final_model(...)[0].keras_model`, or a
      pruned copy with the same layers).
    model_config: the run's `model_config.json`.
    user_index, item_index: the run's id maps.
    export_base, model_name, version: where (`<base>/<name>/<version>`).
    options: signatures' behaviour.
    seen: training ratings, needed for `options.exclude_seen` (table models).
    storage_fn: turns the float scoring model into its stored form (e.g.
      `compression.quantization.storage_fn('int8')`).
    overwrite: replace an existing version directory.
  """
  variant = check_supported(model_config)
  check_finite(keras_model)
  final = check_version(export_base, model_name, version, overwrite)
  _check_catalog(model_config, user_index, item_index, seen)
  if options.exclude_seen and variant != 'local' and seen is None:
    raise ExportError('exclude_seen needs the training ratings (seen=...)')
  user_ids, item_ids = user_index.raw_ids.tolist(), item_index.raw_ids.tolist()
  model = build_serving_model(keras_model, model_config, options, storage_fn)
  with tempfile.TemporaryDirectory(prefix='tff_rec_ids_') as id_dir:
    try:
      if variant == 'local':
        module = _ReconServing(model, model_config, item_ids, options, id_dir)
      else:
        module = _TableServing(model, model_config, user_ids, item_ids, options, seen, id_dir)
    except id_maps.IdMapError as e:
      raise ExportError(str(e)) from e
    return _save(module, model_config, user_ids, item_ids, export_base, model_name, version,
                 final, options, overwrite)


def _save(module, model_config, user_ids, item_ids, export_base, model_name, version, final,
          options, overwrite) -> ExportResult:
  """Saves the module with its warmup requests (`save_module`)."""
  logs = (warmup_requests(model_name, model_config, user_ids, item_ids, options)
          if options.warmup else None)
  return save_module(module, export_base=export_base, model_name=model_name, version=version,
                     final=final, warmup_logs=logs, overwrite=overwrite)


def save_module(module: tf.Module, *, export_base: str, model_name: str, version: int,
                final: str, warmup_logs: Optional[list], overwrite: bool) -> ExportResult:
  """Saves `module` as `<export_base>/<model_name>/<version>` for TF Serving, atomically.

  Args:
    module: A `tf.Module` with a `signatures()` method (name -> concrete function).
    export_base: The folder of `models.config`.
    model_name: The TF Serving model name.
    version: The version number.
    final: The version directory (`check_version`).
    warmup_logs: PredictionLogs written as `assets.extra/tf_serving_warmup_requests`
      (None: none).
    overwrite: Replace an existing version.

  Returns:
    The `ExportResult`.

  The module is saved into a temporary sibling of `final`, the warmup
  requests added, and the directory renamed into place; `models.config` is
  updated last. One export at a time per model directory.
  """
  signatures = module.signatures()
  model_dir = os.path.join(export_base, model_name)
  created = [d for d in (export_base, model_dir) if not os.path.isdir(d)]
  os.makedirs(model_dir, exist_ok=True)
  with _export_lock(model_dir):
    clean_leftovers(model_dir)
    return _save_locked(module, signatures, warmup_logs, export_base, model_name, version,
                        final, overwrite, model_dir, created)


@contextlib.contextmanager
def _export_lock(model_dir: str):
  """One export at a time per model directory (the kernel drops it if the exporter dies).

  The lock is taken on the directory itself (flock works on a directory's
  descriptor), so nothing but versions is ever listed in it.
  """
  fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise ExportError(f'another export into {model_dir} is running; wait for it') from None
    yield
  finally:
    os.close(fd)


def clean_leftovers(model_dir: str) -> list[str]:
  """Removes what a killed export left in `model_dir`; the paths removed.

  A `.tmp-<version>-*` directory is an export that never finished (never a
  version: TF Serving only loads numeric directories). An `.old-<version>-*`
  directory holds a version being replaced: if the new one never arrived it
  is put back, otherwise removed. Call with the export lock held.
  """
  removed = []
  for name in sorted(os.listdir(model_dir)):
    path = os.path.join(model_dir, name)
    if name.startswith('.tmp-') and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
    elif name.startswith('.old-') and os.path.isdir(path):
      version = name.split('-')[1]
      old, final = os.path.join(path, 'old'), os.path.join(model_dir, version)
      if os.path.isdir(old) and not os.path.exists(final) and version.isdigit():
        os.rename(old, final)
        logging.warning('Restored version %s of %s, which a killed export was replacing',
                        version, model_dir)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  for path in removed:
    logging.warning('Removed %s, left by an export that did not finish', path)
  return removed


def _save_locked(module, signatures, warmup_logs, export_base, model_name, version, final,
                 overwrite, model_dir, created) -> ExportResult:
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{version}-', dir=model_dir)
  trash = None
  warmup_file = None
  try:
    tf.saved_model.save(module, tmp, signatures=signatures)
    if warmup_logs:
      warmup_file = warmup.write_warmup(tmp, warmup_logs)
    if os.path.exists(final):
      if not overwrite:
        raise ExportError(f'{final} appeared during the export; pass overwrite=True to replace it')
      trash = tempfile.mkdtemp(prefix=f'.old-{version}-', dir=model_dir)
      os.rename(final, os.path.join(trash, 'old'))
    os.rename(tmp, final)
    config_path = write_models_config(export_base, model_name)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if trash is not None and not os.path.exists(final):
      os.rename(os.path.join(trash, 'old'), final)
    for d in reversed(created):
      if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    raise
  finally:
    if trash is not None:
      shutil.rmtree(trash, ignore_errors=True)
  if warmup_file:
    warmup_file = warmup.warmup_path(final)
  return ExportResult(final, tuple(signatures), config_path, warmup_file)


# ---------------------------------------------------------------------------
# Verification (used by tests and the compression report).


def load_signature(version_dir: str, name: str = SERVING_DEFAULT):
  """A signature of an exported SavedModel, loaded in this process."""
  loaded = tf.saved_model.load(version_dir)
  fn = loaded.signatures[name]
  fn._loaded = loaded  # Keeps the loaded object (and its tables) alive.  pylint: disable=protected-access
  return fn


def saved_model_cli(*args: str, timeout: float = 300.0) -> str:
  """Runs the venv's `saved_model_cli` with `args`; its stdout (RuntimeError on failure)."""
  cli = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  if not os.path.exists(cli):
    raise RuntimeError(f'saved_model_cli not found next to {sys.executable}')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([cli, *args], capture_output=True, text=True, timeout=timeout, env=env,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'saved_model_cli {" ".join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc.stdout


def cli_show(version_dir: str) -> str:
  """`saved_model_cli show --dir ... --all`."""
  return saved_model_cli('show', '--dir', version_dir, '--all')


def cli_run(version_dir: str, signature: str, input_exprs: Mapping[str, str],
            outdir: Optional[str] = None) -> str:
  """`saved_model_cli run` of one signature; with `outdir`, outputs land there as .npy.

  `input_exprs` values are Python literals (the CLI evaluates them with
  `ast.literal_eval`), e.g. `{'user_id': '["1", "2"]', 'k': '10'}`.
  """
  args = ['run', '--dir', version_dir, '--tag_set', 'serve', '--signature_def', signature,
          '--input_exprs', ';'.join(f'{k}={v}' for k, v in input_exprs.items())]
  if outdir:
    args += ['--outdir', outdir, '--overwrite']
  return saved_model_cli(*args)


_FRESH_SCRIPT = r'''
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
fn = loaded.signatures[sys.argv[2]]
data = np.load(sys.argv[3], allow_pickle=False)
out = fn(**{k: tf.constant(data[k]) for k in data.files})
if any(m == 'tff_rec' or m.startswith('tff_rec.') for m in sys.modules):
  raise SystemExit('tff_rec was imported')
result = {}
for k, v in out.items():
  v = v.numpy()
  result[k] = v.astype(np.bytes_) if v.dtype == object else v
np.savez(sys.argv[4], **result)
'''


def predict_in_fresh_process(version_dir: str, signature: str,
                             inputs: Mapping[str, np.ndarray], timeout: float = 300.0) -> dict:
  """Runs a signature in a new isolated Python (`-I`: only TensorFlow, no tff_rec)."""
  with tempfile.TemporaryDirectory() as tmp:
    in_path, out_path = os.path.join(tmp, 'in.npz'), os.path.join(tmp, 'out.npz')
    arrays = {}
    for k, v in inputs.items():
      v = np.asarray(v)
      arrays[k] = v.astype(np.bytes_) if v.dtype.kind in ('U', 'O') else v
    np.savez(in_path, **arrays)
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    env['TF_CPP_MIN_LOG_LEVEL'] = '2'
    proc = subprocess.run(
        [sys.executable, '-I', '-c', _FRESH_SCRIPT, os.path.abspath(version_dir), signature,
         in_path, out_path],
        capture_output=True, text=True, timeout=timeout, cwd=tmp, env=env, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f'fresh-process predict failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    with np.load(out_path, allow_pickle=False) as out:
      return {k: out[k] for k in out.files}
