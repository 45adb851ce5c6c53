"""The federated-NCF evaluation protocol of PFedRec / FedRAP, as published and leak-free.

Taken from PFedRec's reference code (github Zhangcx19/IJCAI-23-PFedRec,
commit abc2380):

* `data.py:67-73`: leave-one-out by time. Per user, the latest interaction is
  the test item and the second latest the validation item; the rest is
  training. (The reference breaks timestamp ties by file order; here, as in
  `splits`, by the larger item index.)
* `data.py:79-80`: 198 evaluation negatives per user, drawn without
  replacement from the items the user never interacted with (the val and test
  items count as interacted); `data.py:127`: the first 99 rank the validation
  item, `data.py:146`: the last 99 the test item.
* `data.py:85-91`, `train.py:98`: every round, 4 fresh training negatives per
  training positive (`random.sample`, so distinct within a positive), drawn
  from the same pool, `item_pool - all interacted items`.

That last rule is the leak the two protocols differ by. Under
`as_published` the held-out val and test items can never be training
negatives, while the 198 evaluation negatives are pushed down round after
round; a model with per-user item embeddings can learn "items I was told are
negative" apart from "items never mentioned". `leak_free` draws training
negatives from the items outside the user's *training* set, as the original
NCF code does, so the held-out items are as likely to be drawn as any other.
The evaluation negatives are the same under both, so scores are comparable.

Nothing here depends on TensorFlow: the arrays feed any trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import splits

PROTOCOLS = ('as_published', 'leak_free')
EVAL_NEGATIVES = 99  # per held-out item (data.py:127, :146)
TRAIN_NEGATIVES = 4  # per training positive (train.py `--num_negative`)


def check_protocol(protocol: str) -> str:
  """`protocol` if it is one of `PROTOCOLS`, else ValueError naming them."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol {protocol!r}; valid: {", ".join(PROTOCOLS)}')
  return protocol


def _offsets(users: np.ndarray, num_users: int) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.bincount(users, minlength=num_users))]).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class FedRecData:
  """One user per client: training positives and held-out val / test items.

  Attributes:
    num_users, num_items: the catalog (every user has val and test items).
    train_offsets: `[num_users + 1]`; user u's training items are
      `train_items[train_offsets[u]:train_offsets[u + 1]]`, oldest first.
    train_items: int32, the training positives of all users.
    val_items, test_items: `[num_users]` int32, the held-out items.
    val_negatives, test_negatives: `[num_users, 99]` int32 evaluation negatives
      (distinct, none interacted with, val and test sets disjoint).
    seed: the seed of the evaluation negatives.
    name: the source ratings' name.
  """

  num_users: int
  num_items: int
  train_offsets: np.ndarray
  train_items: np.ndarray
  val_items: np.ndarray
  test_items: np.ndarray
  val_negatives: np.ndarray
  test_negatives: np.ndarray
  seed: int
  name: str = ''

  def train_items_of(self, user: int) -> np.ndarray:
    return self.train_items[self.train_offsets[user]:self.train_offsets[user + 1]]

  @property
  def train_counts(self) -> np.ndarray:
    return np.diff(self.train_offsets)

  @property
  def train_users(self) -> np.ndarray:
    """The user of each entry of `train_items`."""
    return np.repeat(np.arange(self.num_users, dtype=np.int32), self.train_counts)

  def excluded(self, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, sorted items) per user that training negatives avoid.

    `as_published`: everything the user interacted with (train, val, test);
    `leak_free`: the training items only.
    """
    check_protocol(protocol)
    users = self.train_users
    items = self.train_items
    if protocol == 'as_published':
      held = np.arange(self.num_users, dtype=np.int32)
      users = np.concatenate([users, held, held])
      items = np.concatenate([items, self.val_items, self.test_items])
    order = np.lexsort((items, users))
    return _offsets(users[order], self.num_users), items[order].astype(np.int32)

  def summary(self) -> str:
    return (f'{self.name}: {self.num_users} users, {self.num_items} items, '
            f'{self.train_items.size} training positives, 1 val + 1 test item per user')


def fedrec_split(ratings: ratings_lib.Ratings, *, seed: int = 0,
                 num_eval_negatives: int = EVAL_NEGATIVES) -> FedRecData:
  """PFedRec's leave-one-out split with its 2 x 99 evaluation negatives.

  Args:
    ratings: Any ratings; every rating counts as an interaction (implicit
      feedback, `data.py:_binarize`). Repeated (user, item) pairs are an error.
    seed: Seeds the evaluation negatives (`np.random.default_rng(seed)`).
    num_eval_negatives: Negatives per held-out item (99 in the papers).

  Returns:
    The `FedRecData`.

  Raises:
    DataError: a user with fewer than 3 interactions (one must be left for
      training), a repeated pair, or too few unrated items to sample from.
  """
  if num_eval_negatives <= 0:
    raise ValueError(f'num_eval_negatives must be positive, got {num_eval_negatives}')
  s = ratings.sorted_by_user()
  keys = s.users.astype(np.int64) * s.num_items + s.items
  dup = np.flatnonzero(np.diff(np.sort(keys)) == 0)
  if dup.size:
    key = int(np.sort(keys)[dup[0]])
    raise errors.DataError(f'{ratings.name}: user {s.user_index.raw_ids[key // s.num_items]} '
                           f'interacted with item {s.item_index.raw_ids[key % s.num_items]} '
                           'twice; leave-one-out needs one record per pair')
  present = s.present_users()
  if present.size != s.num_users:
    missing = np.setdiff1d(np.arange(s.num_users), present)
    raise errors.DataError(f'{ratings.name}: {missing.size} user(s) of the catalog have no '
                           f'ratings, e.g. user {s.user_index.raw_ids[missing[0]]}')
  offsets = s.user_offsets()
  counts = np.diff(offsets)
  if counts.min() < 3:
    u = int(np.argmin(counts))
    raise errors.DataError(f'{ratings.name}: user {s.user_index.raw_ids[u]} has {counts[u]} '
                           'interaction(s); the protocol needs at least 3 (train, val, test)')
  test_pos = offsets[1:] - 1
  val_pos = offsets[1:] - 2
  is_train = np.ones(s.num_ratings, bool)
  is_train[test_pos] = False
  is_train[val_pos] = False
  rng = np.random.default_rng(seed)
  negatives = np.empty((s.num_users, 2 * num_eval_negatives), np.int32)
  for u in range(s.num_users):
    try:
      negatives[u] = splits.sample_negatives(rng, s.items[offsets[u]:offsets[u + 1]],
                                             s.num_items, 2 * num_eval_negatives)
    except ValueError as e:
      raise errors.DataError(f'{ratings.name}: user {s.user_index.raw_ids[u]}: {e}') from None
  return FedRecData(
      num_users=s.num_users, num_items=s.num_items,
      train_offsets=_offsets(s.users[is_train], s.num_users),
      train_items=s.items[is_train].astype(np.int32),
      val_items=s.items[val_pos].astype(np.int32), test_items=s.items[test_pos].astype(np.int32),
      val_negatives=negatives[:, :num_eval_negatives],
      test_negatives=negatives[:, num_eval_negatives:], seed=seed, name=ratings.name)


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
  pos = np.searchsorted(sorted_keys, keys)
  return (pos < sorted_keys.size) & (sorted_keys[np.minimum(pos, sorted_keys.size - 1)] == keys)


def sample_training_negatives(data: FedRecData, protocol: str, rng: np.random.Generator, *,
                              per_positive: int = TRAIN_NEGATIVES,
                              users: Optional[np.ndarray] = None) -> np.ndarray:
  """Fresh training negatives: `[P, per_positive]` for the P training positives.

  Row k belongs to training positive k (of `users`, in `train_items` order);
  its items are distinct, uniform over the protocol's pool
  (`FedRecData.excluded`), as `random.sample(negative_items, 4)` in
  `data.py:88`. Vectorized rejection sampling.

  Args:
    data: The split.
    protocol: 'as_published' or 'leak_free'.
    rng: The round's generator.
    per_positive: Negatives per positive.
    users: Sorted user indices to sample for (default all).

  Returns:
    int32 array `[P, per_positive]`.
  """
  if per_positive <= 0:
    raise ValueError(f'per_positive must be positive, got {per_positive}')
  ex_off, ex_items = data.excluded(protocol)
  ex_users = np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(ex_off))
  ex_keys = ex_users * data.num_items + ex_items
  free = data.num_items - np.diff(ex_off)
  if users is None:
    users = np.arange(data.num_users)
  users = np.asarray(users, np.int64)
  if (free[users] < per_positive).any():
    u = int(users[np.argmin(free[users])])
    raise ValueError(f'user {u} has only {free[u]} items to draw {per_positive} negatives from')
  pos_user = np.repeat(users, data.train_counts[users])
  out = rng.integers(data.num_items, size=(pos_user.size, per_positive))
  todo = np.arange(pos_user.size)
  while todo.size:
    rows = out[todo]
    bad = _member(ex_keys, pos_user[todo, None] * data.num_items + rows)
    srt = np.sort(rows, axis=1)
    dup_sorted = np.zeros_like(bad)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    redo = bad.any(axis=1) | dup_sorted.any(axis=1)
    todo = todo[redo]
    out[todo] = rng.integers(data.num_items, size=(todo.size, per_positive))
  return out.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RoundExamples:
  """One round's training examples of some users, grouped by user, shuffled within each."""

  users: np.ndarray  # the users, sorted
  offsets: np.ndarray  # [len(users) + 1] into items / labels
  items: np.ndarray  # int32
  labels: np.ndarray  # float32, 1 positive, 0 negative

  def of(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = self.offsets[k], self.offsets[k + 1]
    return self.items[lo:hi], self.labels[lo:hi]


def round_examples(data: FedRecData, protocol: str, rng: np.random.Generator, *,
                   per_positive: int = TRAIN_NEGATIVES,
                   users: Optional[np.ndarray] = None) -> RoundExamples:
  """Each positive followed by its fresh negatives, shuffled within the user
  (the reference's `DataLoader(shuffle=True)`, engine.py:36)."""
  users = np.arange(data.num_users) if users is None else np.sort(np.asarray(users, np.int64))
  neg = sample_training_negatives(data, protocol, rng, per_positive=per_positive, users=users)
  pos = np.concatenate([data.train_items_of(int(u)) for u in users]) if users.size else np.zeros(
      0, np.int32)
  items = np.concatenate([pos[:, None], neg], axis=1).reshape(-1)
  labels = np.zeros((pos.size, per_positive + 1), np.float32)
  labels[:, 0] = 1.0
  labels = labels.reshape(-1)
  counts = data.train_counts[users] * (per_positive + 1)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  owner = np.repeat(np.arange(users.size), counts)
  order = np.lexsort((rng.random(items.size), owner))
  return RoundExamples(users.astype(np.int32), offsets, items[order].astype(np.int32),
                       labels[order])
