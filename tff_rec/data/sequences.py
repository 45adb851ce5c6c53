"""Per-user chronological sequences and the SASRec evaluation protocol.

Taken from the reference code of Kang and McAuley, "Self-Attentive Sequential
Recommendation" (ICDM 2018; github kang205/SASRec):

* `data/DataProcessing.py:47-52`: users and items with fewer than 5 actions
  are dropped, counted once on the raw data (one pass, not iterated to a
  fixed point); each user's actions are ordered by time. Here timestamp ties
  are broken by the item's raw id (`Ratings.sorted_by_user`), so the order
  never depends on file order.
* `util.py:28-39`: a user with fewer than 3 actions keeps them all for
  training; otherwise the last action is the test item, the second to last
  the validation item and the rest the training sequence.
* `util.py:52-68`: the test item is ranked after the sequence `train + [valid]`,
  the validation item after `train`, each against 100 negatives drawn
  uniformly from the items outside the user's *training* set. Here the
  negatives avoid every item the user rated (training, validation and test),
  so the other held-out item is never a negative, and they are drawn once per
  split from `seed`, so every model is ranked against the same candidates.

Items are numbered 1..num_items; 0 is the padding id of the models' input
windows. Nothing here depends on TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import readers

EVAL_NEGATIVES = 100  # util.py:62
MIN_ACTIONS = 5  # DataProcessing.py:47
PAD = 0


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceSplit:
  """Chronological per-user sequences with held-out validation and test items.

  Attributes:
    train: Per user, the training items in time order (int32, ids 1..num_items).
    valid: Per user, the validation item, 0 if the user has fewer than 3 actions.
    test: Per user, the test item, 0 likewise.
    valid_negatives: int32 [num_users, num_negatives], the validation item's
      candidates (rows of users without a held-out item are 0).
    test_negatives: int32 [num_users, num_negatives], likewise for the test item.
    item_index: Raw item ids: item id k is `item_index.raw_ids[k - 1]`.
    user_index: Raw user ids, one per row.
    name: The data set's name.
    cold_items: Sorted item ids held out of training entirely (`hold_out_items`):
      absent from every training sequence and never a training negative.
  """

  train: list
  valid: np.ndarray
  test: np.ndarray
  valid_negatives: np.ndarray
  test_negatives: np.ndarray
  item_index: ratings_lib.IdIndex
  user_index: ratings_lib.IdIndex
  name: str = 'sequences'
  cold_items: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

  @property
  def num_users(self) -> int:
    return len(self.train)

  @property
  def num_items(self) -> int:
    """The largest item id (ids are 1..num_items; 0 is padding)."""
    return len(self.item_index)

  @property
  def evaluated_users(self) -> np.ndarray:
    """Users with a validation and a test item (those that are ranked)."""
    return np.flatnonzero(self.test > 0)

  def users_by_test_item(self, *, cold: bool) -> np.ndarray:
    """Evaluated users whose test item is (or is not) a cold item."""
    users = self.evaluated_users
    return users[np.isin(self.test[users], self.cold_items) == cold]

  def history(self, user: int, *, for_test: bool) -> np.ndarray:
    """The sequence a held-out item is ranked after: train, plus valid for test."""
    seq = self.train[user]
    if for_test and self.valid[user] > 0:
      seq = np.append(seq, self.valid[user]).astype(np.int32)
    return seq

  def summary(self) -> dict:
    lengths = np.array([len(s) for s in self.train])
    return {'name': self.name, 'users': self.num_users, 'items': self.num_items,
            'evaluated_users': int(self.evaluated_users.size),
            'actions': int(lengths.sum() + 2 * self.evaluated_users.size),
            'mean_train_length': float(lengths.mean()) if lengths.size else 0.0}


def five_core(ratings: ratings_lib.Ratings, min_actions: int = MIN_ACTIONS) -> ratings_lib.Ratings:
  """Drops users and items with fewer than `min_actions` actions (one pass on raw counts).

  Both counts are taken on `ratings` as given, as `DataProcessing.py` does; a
  user can therefore keep fewer than `min_actions` actions after its rare
  items go. The result is compacted to the users and items left.
  """
  if min_actions < 1:
    raise ValueError(f'min_actions must be >= 1, got {min_actions}')
  user_counts = np.bincount(ratings.users, minlength=ratings.num_users)
  item_counts = np.bincount(ratings.items, minlength=ratings.num_items)
  keep = (user_counts[ratings.users] >= min_actions) & (item_counts[ratings.items] >= min_actions)
  if not keep.any():
    raise errors.DataError(f'{ratings.name}: no actions left after dropping users and items '
                           f'with fewer than {min_actions} actions')
  return readers.compact_catalog(ratings.select(keep))


def _draw_negatives(rng: np.random.Generator, rated: np.ndarray, num_items: int,
                    count: int) -> np.ndarray:
  """`count` distinct ids from 1..num_items outside the sorted array `rated`."""
  available = num_items - rated.size
  if available < count:
    raise errors.DataError(f'a user rated {rated.size} of {num_items} items, leaving fewer than '
                           f'{count} to draw evaluation negatives from')
  out = np.empty(0, np.int32)
  while out.size < count:
    draw = rng.integers(1, num_items + 1, size=2 * (count - out.size) + 8).astype(np.int32)
    pos = np.searchsorted(rated, draw)
    pos[pos == rated.size] = 0
    fresh = draw[rated[pos] != draw] if rated.size else draw
    out = np.unique(np.concatenate([out, fresh]))
    if out.size > count:
      out = rng.permutation(out)[:count]
  return rng.permutation(out).astype(np.int32)


def split_sequences(ratings: ratings_lib.Ratings, *, seed: int = 0,
                    num_negatives: int = EVAL_NEGATIVES,
                    min_actions: Optional[int] = MIN_ACTIONS) -> SequenceSplit:
  """Splits ratings into per-user sequences with the last two actions held out.

  Args:
    ratings: Rating records with timestamps (any value counts as an action).
    seed: Seed of the evaluation negatives.
    num_negatives: Negatives per held-out item.
    min_actions: Drop users and items with fewer actions first (`five_core`);
      None keeps everything.

  Returns:
    The `SequenceSplit`, over the users and items left after filtering.

  Raises:
    DataError: No actions left, or a user has rated too many items to draw
      `num_negatives` negatives.
  """
  r = five_core(ratings, min_actions) if min_actions else readers.compact_catalog(ratings)
  r = r.sorted_by_user()
  offsets = r.user_offsets()
  items = r.items + 1  # 1-based; 0 pads
  num_items = r.num_items
  rng = np.random.default_rng(seed)
  train, valid, test = [], np.zeros(r.num_users, np.int32), np.zeros(r.num_users, np.int32)
  valid_neg = np.zeros((r.num_users, num_negatives), np.int32)
  test_neg = np.zeros((r.num_users, num_negatives), np.int32)
  for u in range(r.num_users):
    seq = items[offsets[u]:offsets[u + 1]].astype(np.int32)
    if seq.size < 3:
      train.append(seq)
      continue
    train.append(seq[:-2])
    valid[u], test[u] = seq[-2], seq[-1]
    rated = np.unique(seq)
    valid_neg[u] = _draw_negatives(rng, rated, num_items, num_negatives)
    test_neg[u] = _draw_negatives(rng, rated, num_items, num_negatives)
  return SequenceSplit(train=train, valid=valid, test=test, valid_negatives=valid_neg,
                       test_negatives=test_neg, item_index=r.item_index,
                       user_index=r.user_index, name=r.name)


def hold_out_items(split: SequenceSplit, *, fraction: float = 0.1, seed: int = 0) -> SequenceSplit:
  """Holds a random `fraction` of the items out of training entirely (cold-start items).

  The chosen items are removed from every training sequence (as inputs and
  as targets) and recorded in `cold_items`, which training negatives avoid.
  Validation and test items, histories at evaluation time and the
  evaluation negatives are unchanged, so the test items that are cold
  measure how well a model ranks items it has never been trained on.

  Args:
    split: The split.
    fraction: Share of items to hold out, in (0, 1).
    seed: Seed of the choice.

  Returns:
    A new split with `cold_items` set.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}')
  if split.cold_items.size:
    raise ValueError(f'{split.name} already has {split.cold_items.size} cold items')
  rng = np.random.default_rng([seed, 0xC01D])
  count = max(1, int(round(fraction * split.num_items)))
  cold = np.sort(rng.choice(np.arange(1, split.num_items + 1), size=count, replace=False)).astype(np.int32)
  train = [s[~np.isin(s, cold)].astype(np.int32) for s in split.train]
  return dataclasses.replace(split, train=train, cold_items=cold)


def left_padded(seq: np.ndarray, maxlen: int) -> np.ndarray:
  """The last `maxlen` items of `seq`, left-padded with 0 to length `maxlen`."""
  out = np.zeros(maxlen, np.int32)
  tail = seq[-maxlen:]
  if tail.size:
    out[maxlen - tail.size:] = tail
  return out


def eval_inputs(split: SequenceSplit, maxlen: int, *, which: str,
                users: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inputs for ranking one held-out item per user.

  Args:
    split: The split.
    maxlen: Input window.
    which: 'valid' or 'test'.
    users: Users to rank (default: `split.evaluated_users`).

  Returns:
    `(windows int32 [U, maxlen], candidates int32 [U, 1 + negatives] with the
    held-out item first, users)`.
  """
  if which not in ('valid', 'test'):
    raise ValueError(f'which must be "valid" or "test", got {which!r}')
  users = split.evaluated_users if users is None else np.asarray(users)
  target = split.valid if which == 'valid' else split.test
  negatives = split.valid_negatives if which == 'valid' else split.test_negatives
  windows = np.stack([left_padded(split.history(u, for_test=which == 'test'), maxlen)
                      for u in users]) if users.size else np.zeros((0, maxlen), np.int32)
  candidates = np.concatenate([target[users, None], negatives[users]], axis=1).astype(np.int32)
  return windows, candidates, users
