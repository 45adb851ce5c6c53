"""A centralized `tf.data` view of a split part, for central baselines."""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from tff_rec.data import ratings as ratings_lib


def arrays(r: ratings_lib.Ratings, negatives_per_positive: int = 0, seed: int = 0):
  """(user, item, label) numpy arrays; implicit labels with sampled negatives."""
  if not negatives_per_positive:
    return r.users, r.items, r.ratings
  rng = np.random.default_rng(seed)
  order = np.lexsort((r.items, r.users))
  users, items = r.users[order], r.items[order]
  all_item_ids = np.arange(r.num_items, dtype=np.int32)
  neg_users, neg_items = [], []
  bounds = np.flatnonzero(np.diff(users)) + 1
  for chunk_users, chunk_items in zip(np.split(users, bounds), np.split(items, bounds)):
    if not len(chunk_users):
      continue
    need = len(chunk_items) * negatives_per_positive
    # Uniform with replacement over the user's unrated items (the NCF recipe).
    candidates = np.setdiff1d(all_item_ids, chunk_items, assume_unique=False)
    if not len(candidates):
      raise ValueError(f'user {chunk_users[0]} rated every item; no negatives to sample')
    picked = rng.choice(candidates, need, replace=True)
    neg_users.append(np.full(need, chunk_users[0], np.int32))
    neg_items.append(picked)
  all_users = np.concatenate([users] + neg_users).astype(np.int32)
  all_items = np.concatenate([items] + neg_items).astype(np.int32)
  labels = np.concatenate([np.ones(len(users), np.float32),
                           np.zeros(len(all_users) - len(users), np.float32)])
  return all_users, all_items, labels


def dataset(
    r: ratings_lib.Ratings,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    negatives_per_positive: int = 0,
) -> tf.data.Dataset:
  """Batches of `OrderedDict(x=OrderedDict(user, item), y)` over all ratings."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  users, items, labels = arrays(r, negatives_per_positive, seed)
  ds = tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(
          x=collections.OrderedDict(user=users.astype(np.int32), item=items.astype(np.int32)),
          y=labels.astype(np.float32),
      )
  )
  if shuffle:
    ds = ds.shuffle(len(users), seed=seed, reshuffle_each_iteration=True)
  return ds.batch(batch_size)


def keras_dataset(r: ratings_lib.Ratings, batch_size: int, **kwargs) -> tf.data.Dataset:
  """The same batches as `(x, y)` tuples, for `tf.keras.Model.fit`."""
  return dataset(r, batch_size, **kwargs).map(lambda e: (e['x'], e['y']))
