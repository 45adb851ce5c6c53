"""A federated view of ratings: one TFF client per user, built worker-side.

Client ids are dense user indices as strings (`'17'`), optionally suffixed
with a round number (`'17:4'`) that reseeds the shuffle, so runs stay
deterministic under a seed (and on resume) while the order changes each round.
The dataset function is serializable (`ClientData.dataset_computation`), so
TFF builds each client's `tf.data.Dataset` inside its runtime from the id; the
ratings travel once, as constants of that computation, not every round; or,
with a `storage_dir`, they stay in one small file per user that the worker
reads (`write_user_shards`), which keeps the computation small for large data
sets and lets remote workers with shared storage read only their users.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import ratings as ratings_lib


@dataclasses.dataclass(frozen=True)
class ClientDatasetConfig:
  """How each client's local dataset is prepared."""

  batch_size: int = 32
  num_epochs: int = 1
  max_examples_per_user: Optional[int] = None  # latest-first cut, by time
  shuffle: bool = True
  seed: int = 0
  # Implicit feedback: sample this many unrated items per rating as
  # negatives (label 0; ratings become label 1). 0 keeps explicit ratings.
  negatives_per_positive: int = 0

  def __post_init__(self):
    if self.batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {self.batch_size}')
    if self.num_epochs <= 0:
      raise ValueError(f'num_epochs must be positive, got {self.num_epochs}')
    if self.max_examples_per_user is not None and self.max_examples_per_user <= 0:
      raise ValueError(
          f'max_examples_per_user must be positive, got {self.max_examples_per_user}'
      )
    if self.negatives_per_positive < 0:
      raise ValueError('negatives_per_positive must be >= 0')


def element_spec() -> collections.OrderedDict:
  """The (batched) element structure of every client dataset."""
  return collections.OrderedDict(
      x=collections.OrderedDict(
          user=tf.TensorSpec([None], tf.int32),
          item=tf.TensorSpec([None], tf.int32),
      ),
      y=tf.TensorSpec([None], tf.float32),
  )


def client_id(user: int, round_num: Optional[int] = None) -> str:
  """The client id of a dense user index (and optional round reseeding)."""
  return str(int(user)) if round_num is None else f'{int(user)}:{int(round_num)}'


def cap_latest(r: ratings_lib.Ratings, max_examples: Optional[int]) -> ratings_lib.Ratings:
  """Sorted by user then time, keeping each user's latest `max_examples`."""
  r = r.sorted_by_user()
  if max_examples is None or r.num_ratings == 0:
    return r
  offsets = r.user_offsets()
  ends = offsets[r.users + 1]
  keep = (ends - np.arange(r.num_ratings)) <= max_examples
  return r.select(keep)


class _Tables:
  """Per-user contiguous slices of the ratings, as numpy arrays."""

  def __init__(self, r: ratings_lib.Ratings):
    self.items = r.items.astype(np.int32)
    self.labels = r.ratings.astype(np.float32)
    self.offsets = r.user_offsets()
    self.num_items = r.num_items


def _parse_client_id(cid: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(user as int32, round number as int64 (0 if absent), user as string)."""
  parts = tf.strings.split(cid, ':')
  user = tf.strings.to_number(parts[0], tf.int32)
  round_num = tf.cond(
      tf.size(parts) > 1,
      lambda: tf.strings.to_number(parts[-1], tf.int64),
      lambda: tf.constant(0, tf.int64),
  )
  return user, round_num, parts[0]


def _client_dataset(config: ClientDatasetConfig, num_items: int, user, round_num,
                    u_items, u_labels) -> tf.data.Dataset:
  """One user's training dataset from their (time-ordered) items and labels."""
  n = tf.shape(u_items)[0]
  seed = tf.stack([tf.cast(config.seed, tf.int64) * 1_000_003 + tf.cast(user, tf.int64), round_num])
  if config.negatives_per_positive:
    num_neg = n * config.negatives_per_positive
    # Sample uniformly among the items this user has not rated.
    rated = tf.tensor_scatter_nd_update(
        tf.zeros([num_items], tf.int32),
        tf.expand_dims(u_items, 1),
        tf.ones_like(u_items),
    )
    candidates = tf.cast(tf.where(tf.equal(rated, 0))[:, 0], tf.int32)
    num_candidates = tf.shape(candidates, out_type=tf.int64)[0]
    # A user who rated every item gets no negatives.
    num_neg = tf.where(num_candidates > 0, num_neg, tf.zeros_like(num_neg))
    picks = tf.random.stateless_uniform(
        [num_neg], seed=seed + 7, maxval=tf.maximum(num_candidates, 1), dtype=tf.int64
    )
    neg_items = tf.gather(candidates, picks)
    u_items = tf.concat([u_items, neg_items], 0)
    u_labels = tf.concat([tf.ones_like(u_labels), tf.zeros([num_neg], tf.float32)], 0)
  count = tf.shape(u_items, out_type=tf.int64)[0]
  # One (stateless, seeded) permutation per local epoch.
  orders = []
  for epoch in range(config.num_epochs):
    if config.shuffle:
      noise = tf.random.stateless_uniform([count], seed=seed + [0, 1_000_000 * (epoch + 1)])
      orders.append(tf.argsort(noise))
    else:
      orders.append(tf.range(count, dtype=tf.int32))
  order = tf.concat(orders, 0)
  ds = tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(
          x=collections.OrderedDict(
              user=tf.fill(tf.shape(order), user),
              item=tf.gather(u_items, order),
          ),
          y=tf.gather(u_labels, order),
      )
  )
  return ds.batch(config.batch_size)


def make_dataset_fn(
    r: ratings_lib.Ratings,
    config: ClientDatasetConfig,
    storage_dir: Optional[str] = None,
):
  """A serializable `client_id -> tf.data.Dataset` over `r`'s users.

  By default the ratings are constants of the function (it works on any
  worker). With `storage_dir`, each user's rows are written once to a file
  there (`write_user_shards`) and the function reads only that user's
  file, worker-side: a far smaller graph, for large data sets; remote
  workers then need the same path (shared storage). Both give the same
  datasets.

  Args:
    r: The ratings (one client per user with ratings).
    config: Batching, shuffling, epochs and per-user caps.
    storage_dir: Where per-user files are written and read (None: constants).

  Returns:
    A `tff.tensorflow.computation`-compatible function of a client id.
  """
  capped = cap_latest(r, config.max_examples_per_user)
  num_items = int(r.num_items)
  if storage_dir is not None:
    shard_dir = write_user_shards(capped, storage_dir)

    def file_dataset_fn(cid: tf.Tensor) -> tf.data.Dataset:
      user, round_num, user_str = _parse_client_id(cid)
      u_items, u_labels = _read_user_shard(shard_dir, user_str)
      return _client_dataset(config, num_items, user, round_num, u_items, u_labels)

    return file_dataset_fn

  tables = _Tables(capped)

  def dataset_fn(cid: tf.Tensor) -> tf.data.Dataset:
    # Constants are created inside the function so it serializes into TFF.
    items = tf.constant(tables.items)
    labels = tf.constant(tables.labels)
    offsets = tf.constant(tables.offsets)
    user, round_num, _ = _parse_client_id(cid)
    start, end = offsets[user], offsets[user + 1]
    return _client_dataset(config, num_items, user, round_num, items[start:end], labels[start:end])

  return dataset_fn


_SHARD_SUFFIX = '.rows'


def _fingerprint(r: ratings_lib.Ratings) -> str:
  """A content hash of the per-user rows (so a stale shard dir is never reused)."""
  h = hashlib.sha256()
  for a in (r.users.astype(np.int32), r.items.astype(np.int32), r.ratings.astype(np.float32)):
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(str((int(r.num_users), int(r.num_items))).encode())
  return h.hexdigest()[:24]


def write_user_shards(r: ratings_lib.Ratings, storage_dir: str) -> str:
  """Writes one file per user of `r` (rows in `r`'s order); returns their folder.

  A user's file holds their item ids (int32) then labels (float32), raw
  little-endian. The folder is named by a hash of the contents and built
  in a temporary sibling then renamed into place, so concurrent writers and
  interrupted writes never leave a partial folder behind.
  """
  r = r.sorted_by_user() if r.num_ratings and np.any(np.diff(r.users) < 0) else r
  label = re.sub(r'[^A-Za-z0-9_.-]+', '_', r.name or 'ratings')
  shard_dir = os.path.join(os.path.abspath(storage_dir), f'{label}-{_fingerprint(r)}')
  if os.path.isdir(shard_dir):
    return shard_dir
  os.makedirs(storage_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(shard_dir) + '.tmp', dir=os.path.dirname(shard_dir))
  try:
    items = r.items.astype('<i4')
    labels = r.ratings.astype('<f4')
    offsets = r.user_offsets()
    for u in range(int(r.num_users)):
      start, end = offsets[u], offsets[u + 1]
      with open(os.path.join(tmp, f'{u}{_SHARD_SUFFIX}'), 'wb') as f:
        f.write(items[start:end].tobytes())
        f.write(labels[start:end].tobytes())
    os.chmod(tmp, 0o755)
    try:
      os.replace(tmp, shard_dir)
    except OSError:
      if not os.path.isdir(shard_dir):  # Not a concurrent writer that won.
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return shard_dir


def _read_user_shard(shard_dir: str, user_str: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(items, labels) of one user from their shard file (read where TF runs)."""
  path = tf.strings.join([shard_dir, '/', user_str, _SHARD_SUFFIX])
  raw = tf.io.decode_raw(tf.io.read_file(path), tf.int32, little_endian=True)
  half = tf.shape(raw)[0] // 2
  return raw[:half], tf.bitcast(raw[half:], tf.float32)


def client_data(
    r: ratings_lib.Ratings,
    config: ClientDatasetConfig = ClientDatasetConfig(),
    users: Optional[Sequence[int]] = None,
    storage_dir: Optional[str] = None,
) -> tff.simulation.datasets.ClientData:
  """A ClientData with one client per user present in `r` (or `users`).

  `storage_dir`: read each user's rows from a file there (see
  `make_dataset_fn`) instead of embedding all ratings in the computation.
  """
  present = r.present_users() if users is None else np.asarray(users)
  if len(present) == 0:
    raise ValueError(f'{r.name}: no users with ratings, cannot build clients')
  ids = [client_id(u) for u in present]
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      ids, make_dataset_fn(r, config, storage_dir)
  )


# The key of `x` that marks query rows in evaluation datasets.
QUERY_KEY = 'query'


def eval_element_spec() -> collections.OrderedDict:
  """Element spec of support+query datasets: `x['query']` marks query rows.

  Consumers strip `query` (see `strip_query`) before batches reach a model.
  """
  spec = element_spec()
  spec['x'][QUERY_KEY] = tf.TensorSpec([None], tf.bool)
  return spec


def strip_query(element: collections.OrderedDict) -> collections.OrderedDict:
  """A batch without the `x['query']` marker."""
  x = collections.OrderedDict((k, v) for k, v in element['x'].items() if k != QUERY_KEY)
  return collections.OrderedDict(x=x, y=element['y'])


def make_eval_dataset_fn(
    support: Optional[ratings_lib.Ratings],
    query: ratings_lib.Ratings,
    batch_size: int,
    max_support_per_user: Optional[int] = None,
):
  """A serializable `client_id -> dataset` of a user's support then query rows.

  Support rows (`x['query']=False`) are what a model may adapt to
  (reconstruct a user embedding, fine-tune); query rows (`True`) are scored.
  With no `support`, elements have the plain `element_spec()` (no marker):
  the query rows alone, or data the consumer splits itself (e.g. FedRecon's
  even/odd batch split for unseen users).

  Args:
    support: Ratings a model may adapt to, per user (None: none).
    query: Ratings that are scored.
    batch_size: Examples per batch.
    max_support_per_user: Keep only each user's latest support rows.

  Returns:
    A serializable function of a client id.
  """
  q = _Tables(cap_latest(query, None))
  s = _Tables(cap_latest(support, max_support_per_user)) if support is not None else None
  mark = support is not None

  def dataset_fn(cid: tf.Tensor) -> tf.data.Dataset:
    user = tf.strings.to_number(tf.strings.split(cid, ':')[0], tf.int32)
    q_off = tf.constant(q.offsets)
    q_items = tf.constant(q.items)[q_off[user]:q_off[user + 1]]
    q_labels = tf.constant(q.labels)[q_off[user]:q_off[user + 1]]
    if s is not None:
      s_off = tf.constant(s.offsets)
      s_items = tf.constant(s.items)[s_off[user]:s_off[user + 1]]
      s_labels = tf.constant(s.labels)[s_off[user]:s_off[user + 1]]
    else:
      s_items = tf.zeros([0], tf.int32)
      s_labels = tf.zeros([0], tf.float32)
    query_ds = _pairs(user, q_items, q_labels, True if mark else None).batch(batch_size)
    if not mark:
      return query_ds
    support_ds = _pairs(user, s_items, s_labels, False).batch(batch_size)
    return support_ds.concatenate(query_ds)

  return dataset_fn


def _pairs(user, items, labels, mark: Optional[bool]) -> tf.data.Dataset:
  """Rows of one user; with `x['query']=mark` unless mark is None."""
  n = tf.shape(items)[0]
  x = collections.OrderedDict(user=tf.fill([n], user), item=items)
  if mark is not None:
    x[QUERY_KEY] = tf.fill([n], mark)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=labels))


def eval_client_data(
    support: Optional[ratings_lib.Ratings],
    query: ratings_lib.Ratings,
    batch_size: int,
    max_support_per_user: Optional[int] = None,
) -> tff.simulation.datasets.ClientData:
  """Evaluation ClientData over the users with query rows."""
  users = query.present_users()
  if len(users) == 0:
    raise ValueError(f'{query.name}: no users with ratings to evaluate')
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      [client_id(u) for u in users],
      make_eval_dataset_fn(support, query, batch_size, max_support_per_user),
  )
