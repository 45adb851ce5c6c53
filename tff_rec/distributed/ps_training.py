"""Central training of the toolkit's Keras recommenders on TF's parameter-server engine.

`tf.distribute.ParameterServerStrategy` with a `MinSizePartitioner` places
each large variable (the embedding tables) on the parameter servers as a
`ShardedVariable`, one shard per ps, so a table larger than one machine's
memory is spread over several; a `ClusterCoordinator` schedules training
steps on the workers, which read and update the shards they need over
gRPC (asynchronous training). The same loop runs in one process without a
strategy (`strategy=None`), the reference for the distributed result.

Choices the engine forces on TF 2.14 (each checked here):
* optimizers: SGD or Adagrad. Keras 2.14's Adam updates every row of a table
  on a sparse gradient, which on large tables is 40-160x slower;
* every worker's `tf.data` input pipeline id is 0, so each worker takes its
  own shard of the examples by `experimental_get_current_worker_index()`;
* metrics are computed exactly by the chief over the held-out ratings
  (`predict`), not with `Model.evaluate` over a repeated dataset, which
  double-counts batches;
* the trained model is saved by copying its weights into an unsharded model
  of the same architecture (`unsharded_copy`), which the export path
  (`artifacts.save_final_model`, `compress_and_export`) takes unchanged.

Batch inference (`distributed_top_k`) runs on the workers too: one closure
per user shard scores its users against every item, takes the top k
(excluding each user's training items) and writes that shard's CSV file
itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base
from tff_rec.training import model_fns

OPTIMIZERS = ('sgd', 'adagrad')


@dataclasses.dataclass(frozen=True)
class PsTrainConfig:
  """How to train (the same in one process and on a cluster)."""

  epochs: int = 10
  batch_size: int = 1024
  optimizer: str = 'adagrad'
  learning_rate: float = 0.1
  seed: int = 0
  # Variables above this size are split into shards (at most one per ps).
  min_shard_bytes: int = 256 << 10
  progress_bar: bool = True

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f'optimizer {self.optimizer!r} is not one of {", ".join(OPTIMIZERS)} (Keras '
                       "2.14's Adam updates whole tables on sparse gradients)")
    for name in ('epochs', 'batch_size', 'min_shard_bytes'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f'learning_rate must be finite and positive, got {self.learning_rate}')


def make_strategy(resolver, *, num_ps: int, min_shard_bytes: int):
  """`ParameterServerStrategy` over `resolver`'s cluster with tables split over the ps.

  Args:
    resolver: The chief's cluster resolver (`cluster.LoopbackCluster.resolver()`
      or `cluster.resolver_from_env()`).
    num_ps: Parameter servers in the cluster (the most shards a variable gets).
    min_shard_bytes: Smallest shard size (small variables stay whole).

  Returns:
    A `tf.distribute.experimental.ParameterServerStrategy`.
  """
  partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
      min_shard_bytes=min_shard_bytes, max_shards=num_ps)
  return tf.distribute.experimental.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def _optimizer(config: PsTrainConfig) -> tf.keras.optimizers.Optimizer:
  if config.optimizer == 'sgd':
    return tf.keras.optimizers.SGD(config.learning_rate)
  return tf.keras.optimizers.Adagrad(config.learning_rate)


def _examples(r: ratings_lib.Ratings):
  return ({'user': r.users.astype(np.int32), 'item': r.items.astype(np.int32)},
          r.ratings.astype(np.float32))


@dataclasses.dataclass
class TrainResult:
  rec: base.RecModel  # sharded on a cluster
  history: list
  seconds: float


def train(spec: model_fns.ModelSpec, ratings: ratings_lib.Ratings, config: PsTrainConfig,
          strategy=None) -> TrainResult:
  """Trains `spec`'s model (a user table, rating task) on `ratings`.

  Args:
    spec: The model; must have a rating task (MSE).
    ratings: Training ratings.
    config: Epochs, batch size, optimizer.
    strategy: A `ParameterServerStrategy`, or None to train in this process.

  Returns:
    The trained model (its variables on the ps under a strategy), the loss
    per epoch and the training seconds.

  Raises:
    ValueError: for a model that is not a rating model.
  """
  if spec.task != base.TASK_RATING:
    raise ValueError(f'parameter-server training takes rating models (MSE); {spec.name or "this model"} '
                     f'has task {spec.task!r}')
  x, y = _examples(ratings)
  n = len(y)
  steps = max(1, math.ceil(n / config.batch_size))
  scope = strategy.scope() if strategy is not None else _NullScope()
  with scope:
    rec = spec.build(model_fns.UserEmbedding.TABLE)
    optimizer = _optimizer(config)
    optimizer.build(rec.keras_model.trainable_variables)
  variables = rec.keras_model.trainable_variables

  def step_fn(batch):
    features, labels = batch
    with tf.GradientTape() as tape:
      # The batch MSE, as Keras' MeanSquaredError (whose reduction a strategy refuses).
      loss = tf.reduce_mean(tf.square(labels - rec.keras_model(features, training=True)))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  history = []
  started = time.time()
  bar = tqdm.trange(config.epochs, desc='training', unit='epoch', disable=not config.progress_bar)
  if strategy is None:
    step = tf.function(step_fn)
    for epoch in bar:
      ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
          n, seed=config.seed + epoch).batch(config.batch_size)
      losses = [float(step(batch)) for batch in ds]
      history.append({'epoch': epoch + 1, 'loss': float(np.mean(losses))})
      bar.set_postfix(loss=f'{history[-1]["loss"]:.4f}', refresh=False)
  else:
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
    num_workers = strategy.extended._num_workers  # pylint: disable=protected-access
    seed = config.seed

    def dataset_fn():
      # Every worker's input pipeline id is 0 on TF 2.14: shard by worker index.
      index = tf.distribute.coordinator.experimental_get_current_worker_index()
      ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(num_workers, index)
      return ds.shuffle(n // num_workers + 1, seed=seed, reshuffle_each_iteration=True).repeat().batch(
          config.batch_size)

    iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))

    @tf.function
    def worker_step(it):
      return strategy.run(step_fn, args=(next(it),))

    for epoch in bar:
      losses = [coordinator.schedule(worker_step, args=(iterator,)) for _ in range(steps)]
      coordinator.join()
      history.append({'epoch': epoch + 1,
                      'loss': float(np.mean([l.fetch() for l in losses]))})
      bar.set_postfix(loss=f'{history[-1]["loss"]:.4f}', refresh=False)
  bar.close()
  return TrainResult(rec, history, time.time() - started)


class _NullScope:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def predict(rec: base.RecModel, users: np.ndarray, items: np.ndarray,
            batch_size: int = 65536) -> np.ndarray:
  """The model's ratings for (user, item) pairs, computed by this process (the chief)."""
  call = tf.function(lambda f: rec.keras_model(f, training=False))
  out = [call({'user': tf.constant(users[s:s + batch_size], tf.int32),
               'item': tf.constant(items[s:s + batch_size], tf.int32)}).numpy()
         for s in range(0, len(users), batch_size)]
  return np.concatenate(out) if out else np.zeros([0], np.float32)


_PART = re.compile(r'^(.*)/part_(\d+)(:\d+)$')


def _grouped_weights(rec: base.RecModel) -> dict[str, list]:
  """Variable name -> its shards in order (one entry if whole).

  Under a `ParameterServerStrategy` a Keras model lists the shards of a
  partitioned variable (`<name>/part_<k>:0`) as separate weights.
  """
  groups: dict[str, list] = {}
  for v in rec.keras_model.weights:
    match = _PART.match(v.name)
    name, part = (match.group(1) + match.group(3), int(match.group(2))) if match else (v.name, 0)
    groups.setdefault(name, []).append((part, v))
  return {name: [v for _, v in sorted(parts, key=lambda p: p[0])] for name, parts in groups.items()}


def shard_devices(rec: base.RecModel) -> dict[str, list[str]]:
  """For each variable, the device of each of its shards, in order."""
  return {name: [v.device for v in parts] for name, parts in _grouped_weights(rec).items()}


def unsharded_copy(spec: model_fns.ModelSpec, rec: base.RecModel) -> base.RecModel:
  """The same model outside any strategy, holding the (concatenated) trained weights."""
  plain = spec.build(model_fns.UserEmbedding.TABLE)
  groups = _grouped_weights(rec)
  for target in plain.keras_model.weights:
    parts = groups.get(target.name)
    if parts is None:
      raise ValueError(f'the trained model has no variable {target.name}; it has {sorted(groups)}')
    target.assign(np.concatenate([p.numpy() for p in parts], axis=0) if len(parts) > 1
                  else parts[0].numpy())
  return plain


def _factors(rec: base.RecModel):
  """(user table, item table, user bias, item bias, global bias) of a biased MF, as tensors."""
  def var(name, attr):
    return getattr(rec.keras_model.get_layer(name), attr)
  return (var('user_embedding', 'embeddings'), var('item_embedding', 'embeddings'),
          var('user_bias', 'embeddings'), var('item_bias', 'embeddings'), var('global_bias', 'bias'))


def _check_mf(rec: base.RecModel) -> None:
  names = {layer.name for layer in rec.keras_model.layers}
  needed = {'user_embedding', 'item_embedding', 'user_bias', 'item_bias', 'global_bias'}
  if not needed <= names:
    raise ValueError('batch top-k scoring needs a biased MF (mf with use_biases); missing layers: '
                     + ', '.join(sorted(needed - names)))


def _seen_lists(ratings: ratings_lib.Ratings) -> tuple[np.ndarray, np.ndarray]:
  s = ratings.sorted_by_user()
  return s.user_offsets().astype(np.int64), s.items.astype(np.int32)


def _top_k_graph(rec, users, k: int, offsets, seen, item_ids, user_ids):
  """CSV lines `user_id,rank,item_id,score` of `users`' top k (seen items excluded)."""
  p, q, bu, bi, mu = (tf.convert_to_tensor(t) for t in _factors(rec))
  num_items = tf.shape(q)[0]
  scores = tf.matmul(tf.gather(p, users), q, transpose_b=True)
  scores += tf.gather(bu, users) + tf.transpose(bi) + mu
  starts = tf.gather(offsets, users)
  ends = tf.gather(offsets, users + 1)
  lengths = ends - starts
  rows = tf.repeat(tf.range(tf.size(users, out_type=tf.int64)), lengths)
  positions = tf.ragged.range(starts, ends).flat_values
  cols = tf.cast(tf.gather(seen, positions), tf.int64)
  scores = tf.tensor_scatter_nd_update(
      scores, tf.stack([rows, cols], axis=1), tf.fill(tf.shape(rows), -np.inf))
  top = tf.math.top_k(scores, k=tf.minimum(k, num_items))
  n, kk = tf.shape(top.indices)[0], tf.shape(top.indices)[1]
  user_col = tf.repeat(tf.gather(user_ids, users), kk)
  rank_col = tf.tile(tf.strings.as_string(tf.range(1, kk + 1)), [n])
  item_col = tf.gather(item_ids, tf.reshape(top.indices, [-1]))
  score_col = tf.strings.as_string(tf.reshape(top.values, [-1]), precision=6)
  lines = tf.strings.join([user_col, rank_col, item_col, score_col], separator=',')
  return tf.strings.reduce_join(lines, separator='\n')


def top_k_shard_path(out_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(out_dir, f'top_k-{shard:05d}-of-{num_shards:05d}.csv')


_TOP_K_HEADER = 'user_id,rank,item_id,score'


def distributed_top_k(rec: base.RecModel, ratings: ratings_lib.Ratings, *, k: int, out_dir: str,
                      num_shards: int, strategy=None, users_per_step: int = 256) -> list[str]:
  """Top-k items of every user (excluding their rated items), one CSV file per user shard.

  With a strategy, each shard is a closure scheduled on a worker, which
  computes its users' scores from the parameter servers' shards and writes
  the file itself; without one, this process does the same work. Files are
  `top_k-SSSSS-of-NNNNN.csv` with the header `user_id,rank,item_id,score`
  (raw ids), users in index order.

  Args:
    rec: A trained biased MF (with a user table).
    ratings: The training ratings (their users, items and id maps).
    k: Items per user.
    out_dir: Where the shard files go (must be visible to the workers).
    num_shards: Number of user shards (files).
    strategy: A `ParameterServerStrategy`, or None.
    users_per_step: Users scored at once (bounds the score matrix).

  Returns:
    The paths of the shard files.
  """
  _check_mf(rec)
  if k <= 0 or num_shards <= 0:
    raise ValueError(f'k and num_shards must be positive, got {k} and {num_shards}')
  os.makedirs(out_dir, exist_ok=True)
  offsets, seen = _seen_lists(ratings)
  item_ids = np.asarray(ratings.item_index.raw_ids, dtype=str)
  user_ids = np.asarray(ratings.user_index.raw_ids, dtype=str)
  bounds = np.linspace(0, ratings.num_users, num_shards + 1).astype(np.int64)
  paths = [top_k_shard_path(out_dir, s, num_shards) for s in range(num_shards)]

  def shard_fn(start, end, path):
    def chunk(s):
      users = tf.range(s, tf.minimum(s + users_per_step, end))
      return _top_k_graph(rec, users, k, tf.constant(offsets), tf.constant(seen),
                          tf.constant(item_ids), tf.constant(user_ids))
    starts = tf.range(start, end, users_per_step)
    texts = tf.map_fn(chunk, starts, fn_output_signature=tf.string)
    body = tf.strings.reduce_join(texts, separator='\n')
    content = tf.strings.join([_TOP_K_HEADER, body], separator='\n')
    content = tf.where(end > start, content, tf.constant(_TOP_K_HEADER))
    # Written whole under a temporary name; the chief renames it into place,
    # so a reader never sees half a shard.
    tmp = tf.strings.join([path, '.tmp'])
    tf.io.write_file(tmp, tf.strings.join([content, '\n']))
    return tmp

  fn = tf.function(shard_fn)
  if strategy is None:
    for s, path in enumerate(paths):
      tmp = fn(tf.constant(bounds[s]), tf.constant(bounds[s + 1]), tf.constant(path)).numpy().decode()
      os.replace(tmp, path)
    return paths
  coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
  futures = [coordinator.schedule(fn, args=(tf.constant(bounds[s]), tf.constant(bounds[s + 1]),
                                            tf.constant(path)))
             for s, path in enumerate(paths)]
  coordinator.join()
  for future, path in zip(futures, paths):
    os.replace(future.fetch().decode(), path)
  logging.info('Wrote %d top-%d shard files to %s', num_shards, k, out_dir)
  return paths


def read_top_k(paths: Sequence[str]) -> list[tuple[str, int, str, float]]:
  """All rows of top-k shard files, in file order."""
  rows = []
  for path in paths:
    with open(path) as f:
      header = f.readline().strip()
      if header != _TOP_K_HEADER:
        raise ValueError(f'{path}: line 1 is {header!r}, expected {_TOP_K_HEADER!r}')
      for line_no, line in enumerate(f, start=2):
        if not line.strip():
          continue
        parts = line.rstrip('\n').split(',')
        if len(parts) != 4:
          raise ValueError(f'{path}:{line_no}: expected 4 fields, got {line!r}')
        rows.append((parts[0], int(parts[1]), parts[2], float(parts[3])))
  return rows


def top_k_reference(rec: base.RecModel, ratings: ratings_lib.Ratings, k: int) -> list:
  """Single-process numpy top-k of every user (excluding seen items), as `read_top_k` rows."""
  _check_mf(rec)
  p, q, bu, bi, mu = (np.asarray(t.numpy() if hasattr(t, 'numpy') else t) for t in _factors(rec))
  offsets, seen = _seen_lists(ratings)
  rows = []
  for u in range(ratings.num_users):
    scores = (p[u] @ q.T + bu[u, 0] + bi[:, 0] + mu).astype(np.float32)
    scores[seen[offsets[u]:offsets[u + 1]]] = -np.inf
    order = np.argsort(-scores, kind='stable')[:k]
    rows += [(str(ratings.user_index.raw_ids[u]), r + 1, str(ratings.item_index.raw_ids[i]),
              float(scores[i]))
             for r, i in enumerate(order)]
  return rows


def synthetic_catalog(*, num_users: int, num_items: int, ratings_per_user: int, rank: int = 8,
                      seed: int = 0) -> ratings_lib.Ratings:
  """Low-rank ratings over a large item catalog (e.g. millions of items), generated fast.

  Each user rates `ratings_per_user` distinct items drawn uniformly (the
  catalog is the full `num_items`, so the item table has that many rows);
  ratings are a low-rank score plus noise, rounded to 1..5 stars.
  """
  if min(num_users, num_items, ratings_per_user, rank) <= 0 or ratings_per_user > num_items:
    raise ValueError('num_users, num_items, rank and ratings_per_user must be positive, and '
                     f'ratings_per_user <= num_items; got {num_users}, {num_items}, {rank}, '
                     f'{ratings_per_user}')
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(num_users, dtype=np.int32), ratings_per_user)
  items = rng.integers(0, num_items, size=users.size, dtype=np.int64)
  # Redraw the (rare) repeats within a user until every pair is distinct.
  while True:
    keys = users.astype(np.int64) * num_items + items
    _, first = np.unique(keys, return_index=True)
    repeat = np.ones(keys.size, bool)
    repeat[first] = False
    if not repeat.any():
      break
    items[repeat] = rng.integers(0, num_items, size=int(repeat.sum()))
  scale = 1.0 / np.sqrt(np.sqrt(rank))
  u = rng.normal(0.0, scale, (num_users, rank)).astype(np.float32)
  v = rng.normal(0.0, scale, (num_items, rank)).astype(np.float32)
  score = 3.0 + np.einsum('nr,nr->n', u[users], v[items])
  values = np.clip(np.round(score + rng.normal(0.0, 0.5, score.size)), 1.0, 5.0)
  return ratings_lib.Ratings(
      users=users, items=items.astype(np.int32), ratings=values.astype(np.float32),
      timestamps=np.zeros(users.size, np.int64),
      user_index=ratings_lib.IdIndex.from_raw(str(x) for x in range(num_users)),
      item_index=ratings_lib.IdIndex.from_raw(str(x) for x in range(num_items)),
      name=f'synthetic-catalog-{num_items}')
