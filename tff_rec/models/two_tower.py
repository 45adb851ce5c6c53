"""A two-tower retrieval model: score(u, i) = <user_tower(u), item_tower(i)>.

`build_two_tower` returns the pointwise score model (task 'implicit': the dot
product is a logit), which trains under TFF's per-example Keras loss with BCE
on sampled negatives. The towers share its layers and weights:
`user_tower(model)` / `item_tower(model)` map ids to vectors, so scoring all
items is one matmul (`score_matrix_fn`). `fit_retrieval` trains centrally with
in-batch and/or sampled softmax (TF Recommenders' `Retrieval` task), and
`evaluate_top_k` reports TFRS' `FactorizedTopK` accuracy.

The user tower (its embedding and dense layers) is the local part in the
`personal` variant; the item tower is global. Without `personal` every layer
is global, as in `mf.build_mf`.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tff_rec.models import base

USER_VECTOR = 'user_vector'
ITEM_VECTOR = 'item_vector'
_MIN_LOGIT = -1e9


def _tower(x: tf.Tensor, prefix: str, sizes: Sequence[int], seed: int
           ) -> tuple[tf.Tensor, list[tf.keras.layers.Layer]]:
  """Dense layers (ReLU, the last one linear) ending in a named identity."""
  layers = []
  for k, units in enumerate(sizes):
    last = k == len(sizes) - 1
    dense = tf.keras.layers.Dense(
        units, activation=None if last else 'relu', name=f'{prefix}_dense_{k}',
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + k))
    layers.append(dense)
    x = dense(x)
  x = tf.keras.layers.Activation('linear', name=f'{prefix}_vector')(x)
  return x, layers


def build_two_tower(
    num_users: int,
    num_items: int,
    *,
    embedding_dim: int = 32,
    user_layers: Sequence[int] = (),
    item_layers: Sequence[int] = (64, 32),
    l2: float = 0.0,
    personal: bool = False,
    init_stddev: float = 0.05,
    seed: int = 0,
) -> base.RecModel:
  """Two towers (embedding -> dense layers) joined by a dot product (a logit).

  Args:
    num_users: Rows of the user table (ignored with `personal`).
    num_items: Rows of the item table.
    embedding_dim: Size of both embeddings.
    user_layers: Dense layers of the user tower (empty: the embedding itself).
    item_layers: Dense layers of the item tower; the towers' last sizes must
      agree.
    l2: L2 on the looked-up embedding rows.
    personal: One local user row instead of a user table (FedRecon).
    init_stddev: Stddev of the embeddings' normal initializer.
    seed: Initializer seed.

  Returns:
    A `base.RecModel` for implicit feedback; with `personal` the user tower
    is its local part, otherwise every layer is global.
  """
  user_dim = user_layers[-1] if user_layers else embedding_dim
  item_dim = item_layers[-1] if item_layers else embedding_dim
  if user_dim != item_dim:
    raise ValueError(
        f'user tower outputs {user_dim} dims but item tower {item_dim}; '
        'the last entries of user_layers/item_layers (or embedding_dim) must match')
  inputs = base.model_inputs()
  user_rows = 1 if personal else num_users
  user_index = (base.PersonalIndex(name='personal_index')(inputs['user'])
                if personal else inputs['user'])
  user_emb = base.EmbeddingLookup(
      user_rows, embedding_dim, l2=l2, name='user_embedding',
      initializer=tf.keras.initializers.RandomNormal(stddev=init_stddev, seed=seed))
  item_emb = base.EmbeddingLookup(
      num_items, embedding_dim, l2=l2, name='item_embedding',
      initializer=tf.keras.initializers.RandomNormal(stddev=init_stddev, seed=seed + 1))
  user_vec, user_dense = _tower(user_emb(user_index), 'user', user_layers, seed + 10)
  item_vec, item_dense = _tower(item_emb(inputs['item']), 'item', item_layers, seed + 100)
  score = tf.keras.layers.Dot(axes=1, name='dot')([user_vec, item_vec])
  score = base.DropLastAxis(name='flatten')(score)
  model = tf.keras.Model(inputs=inputs, outputs=score, name='two_tower')
  local_layers = [user_emb, *user_dense]
  global_layers = [item_emb, *item_dense]
  emb_names = ['item_embedding']
  if not personal:
    global_layers = local_layers + global_layers
    local_layers = []
    emb_names = ['user_embedding'] + emb_names
  return base.RecModel(
      keras_model=model,
      global_layers=global_layers,
      local_layers=local_layers,
      task=base.TASK_IMPLICIT,
      personal=personal,
      embedding_variable_names=tuple(emb_names),
  )


def _keras(model: base.RecModel | tf.keras.Model) -> tf.keras.Model:
  return model.keras_model if isinstance(model, base.RecModel) else model


def user_tower(model: base.RecModel | tf.keras.Model) -> tf.keras.Model:
  """The submodel user ids int32[N] -> user vectors [N, d] (shared weights)."""
  km = _keras(model)
  return tf.keras.Model(km.get_layer('user').output, km.get_layer(USER_VECTOR).output,
                        name='user_tower')


def item_tower(model: base.RecModel | tf.keras.Model) -> tf.keras.Model:
  """The submodel item ids int32[N] -> item vectors [N, d] (shared weights)."""
  km = _keras(model)
  return tf.keras.Model(km.get_layer('item').output, km.get_layer(ITEM_VECTOR).output,
                        name='item_tower')


def _num_items(model: base.RecModel | tf.keras.Model) -> int:
  return _keras(model).get_layer('item_embedding').input_dim


def item_vectors(model: base.RecModel | tf.keras.Model, batch_size: int = 65536) -> np.ndarray:
  """Vectors [num_items, d] of every item, from the item tower."""
  tower = item_tower(model)
  ids = np.arange(_num_items(model), dtype=np.int32)
  parts = [tower(ids[s:s + batch_size], training=False).numpy()
           for s in range(0, len(ids), batch_size)]
  return np.concatenate(parts, 0)


def score_matrix_fn(model: base.RecModel | tf.keras.Model
                    ) -> Callable[[np.ndarray], np.ndarray]:
  """users int[b] -> scores [b, num_items], one matmul per call.

  Item vectors are a snapshot of the item tower taken now; call again after
  training to score with the new weights.
  """
  items = item_vectors(model)
  tower = user_tower(model)

  def fn(users: np.ndarray) -> np.ndarray:
    users = np.asarray(users, np.int32)
    return tower(users, training=False).numpy() @ items.T

  return fn


def _positive_pairs(batch) -> tuple[tf.Tensor, tf.Tensor]:
  """(users, items) of a batch's rows with label > 0 (all rows if unlabeled).

  Batches are `OrderedDict(x=OrderedDict(user, item), y)` or `OrderedDict(user, item)`.
  """
  x = batch['x'] if 'x' in batch else batch
  users, items = tf.cast(x['user'], tf.int32), tf.cast(x['item'], tf.int32)
  if 'y' in batch:
    keep = tf.reshape(batch['y'], [-1]) > 0
    users, items = tf.boolean_mask(users, keep), tf.boolean_mask(items, keep)
  return users, items


def fit_retrieval(
    model: base.RecModel,
    dataset: tf.data.Dataset,
    *,
    optimizer: Optional[tf.keras.optimizers.Optimizer] = None,
    epochs: int = 1,
    in_batch: bool = True,
    num_sampled_negatives: int = 0,
    temperature: Optional[float] = None,
    remove_accidental_hits: bool = True,
    seed: int = 0,
) -> list[float]:
  """Trains both towers centrally with a softmax retrieval loss; epoch mean losses.

  `dataset` yields batches `OrderedDict(x=OrderedDict(user, item), y)` (rows
  with y <= 0, e.g. sampled negatives, are dropped) or `OrderedDict(user,
  item)`. Each positive pair's softmax runs over:
  - `in_batch=True`: the batch's positive items, plus `num_sampled_negatives`
    items drawn uniformly per batch and shared by all rows (mixed negative
    sampling); via `tfrs.tasks.Retrieval`;
  - `in_batch=False`: its own item and the `num_sampled_negatives` shared
    uniform negatives only (sampled softmax).
  Negatives equal to the row's positive item are masked when
  `remove_accidental_hits`. The loss is the mean over positive pairs.
  """
  if epochs <= 0:
    raise ValueError(f'epochs must be positive, got {epochs}')
  if num_sampled_negatives < 0:
    raise ValueError(f'num_sampled_negatives must be >= 0, got {num_sampled_negatives}')
  if not in_batch and num_sampled_negatives == 0:
    raise ValueError('sampled softmax (in_batch=False) needs num_sampled_negatives > 0')
  optimizer = optimizer or tf.keras.optimizers.Adam(0.01)
  users_model, items_model = user_tower(model), item_tower(model)
  variables = model.keras_model.trainable_variables
  num_items = _num_items(model)
  task = tfrs.tasks.Retrieval(
      loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
      temperature=temperature,
      remove_accidental_hits=remove_accidental_hits,
  )

  def loss_fn(users, items, step):
    q = users_model(users, training=True)
    c = items_model(items, training=True)
    neg_ids = tf.random.stateless_uniform(
        [num_sampled_negatives], seed=tf.stack([tf.cast(seed, tf.int64), step]),
        maxval=num_items, dtype=tf.int32)
    neg = items_model(neg_ids, training=True)
    if in_batch:
      return task(q, tf.concat([c, neg], 0), candidate_ids=tf.concat([items, neg_ids], 0),
                  compute_metrics=False, compute_batch_metrics=False)
    positive = tf.reduce_sum(q * c, 1, keepdims=True)
    logits = tf.concat([positive, tf.matmul(q, neg, transpose_b=True)], 1)
    if temperature is not None:
      logits /= temperature
    if remove_accidental_hits:
      hit = tf.equal(tf.expand_dims(items, 1), tf.expand_dims(neg_ids, 0))
      logits = tf.concat([logits[:, :1], tf.where(hit, _MIN_LOGIT, logits[:, 1:])], 1)
    labels = tf.zeros(tf.shape(items), tf.int32)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

  ids = tf.TensorSpec([None], tf.int32)

  @tf.function(input_signature=[ids, ids, tf.TensorSpec([], tf.int64)])
  def train_step(users, items, step):
    with tf.GradientTape() as tape:
      loss = loss_fn(users, items, step)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  losses = []
  step = 0
  for _ in range(epochs):
    total, count = 0.0, 0
    for batch in dataset:
      users, items = _positive_pairs(batch)
      n = int(tf.size(users))
      if n == 0:
        continue
      loss = train_step(users, items, tf.constant(step, tf.int64))
      step += 1
      total += float(loss) * n
      count += n
    losses.append(total / count if count else float('nan'))
  return losses


def evaluate_top_k(
    model: base.RecModel,
    dataset: tf.data.Dataset,
    ks: Sequence[int] = (10,),
) -> collections.OrderedDict:
  """TFRS `FactorizedTopK`: how often a pair's item is in its user's top k of all items.

  Per example (not per user), with no exclusion of training items and ties at
  the cut broken by `tf.math.top_k`; `metrics.full_ranking_metrics` is the
  per-user protocol with exclusions and pessimistic ties.
  """
  users_model = user_tower(model)
  vectors = tf.constant(item_vectors(model))
  index = tfrs.layers.factorized_top_k.BruteForce(k=max(ks))
  index.index(vectors, identifiers=tf.range(vectors.shape[0], dtype=tf.int32))
  metric = tfrs.metrics.FactorizedTopK(candidates=index, ks=tuple(ks))
  for batch in dataset:
    users, items = _positive_pairs(batch)
    metric.update_state(users_model(users, training=False), tf.gather(vectors, items),
                        true_candidate_ids=items)
  return collections.OrderedDict(
      (f'top_{k}_accuracy', float(r)) for k, r in zip(ks, metric.result()))
