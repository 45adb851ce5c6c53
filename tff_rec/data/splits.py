"""Train / validation / test splits of ratings, deterministic under a seed.

Every part of a `Split` keeps the catalog of the whole data set, so user and
item indices are comparable across parts. Randomness comes from
`np.random.default_rng(seed)` only. "Latest" means the largest timestamp,
ties broken by the larger item index (the order of `Ratings.sorted_by_user`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import readers

Ratings = ratings_lib.Ratings
DataError = errors.DataError

SPLIT_KINDS = ('by_user', 'by_time', 'random', 'leave_one_out', 'ml100k_fold')
SHORT_USER_POLICIES = ('train', 'drop', 'error')


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Train / val / test ratings over one catalog.

  Attributes:
    train, val, test: the parts (val may be empty).
    kind: how the split was made ('by_user', 'by_time', ...).
    heldout_users: True when val/test users are disjoint from train users;
      they are evaluated after reconstructing their user embedding from
      part of their own ratings, as in Federated Reconstruction.
    negatives: for leave-one-out splits, `[len(test), N]` item indices;
      row k holds the sampled negatives of test record k.
    seed: the seed used, if any.
    info: extra facts about the split (e.g. the fold number).
  """

  train: Ratings
  val: Ratings
  test: Ratings
  kind: str
  heldout_users: bool
  negatives: Optional[np.ndarray] = None
  seed: Optional[int] = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for part in (self.val, self.test):
      for attr in ('user_index', 'item_index'):
        a, b = getattr(self.train, attr), getattr(part, attr)
        if a is not b and a != b:
          raise ValueError(f'Split parts must share one catalog: {part.name}.{attr} differs')
    if self.negatives is not None:
      neg = np.asarray(self.negatives, dtype=np.int32)
      if neg.ndim != 2 or neg.shape[0] != self.test.num_ratings:
        raise ValueError(f'negatives must have shape [{self.test.num_ratings}, N], '
                         f'got {neg.shape}')
      object.__setattr__(self, 'negatives', neg)

  @property
  def parts(self) -> tuple[tuple[str, Ratings], ...]:
    return (('train', self.train), ('val', self.val), ('test', self.test))

  def summary(self) -> str:
    """One line of sizes, for logs."""
    sizes = ', '.join(f'{n} {len(p)} ratings / {len(p.present_users())} users'
                      for n, p in self.parts)
    return f'{self.kind} split ({sizes})'


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
  if len(fractions) != 3:
    raise ValueError(f'fractions must be (train, val, test), got {fractions!r}')
  f = tuple(float(x) for x in fractions)
  if any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
    raise ValueError(f'fractions must be non-negative and sum to 1, got {fractions!r}')
  return f


def _allocate(n: int, fractions: tuple[float, float, float], at_least_one: bool) -> np.ndarray:
  """Counts summing to n, proportional to fractions (largest remainder)."""
  raw = np.array(fractions) * n
  counts = np.floor(raw).astype(np.int64)
  for k in np.argsort(-(raw - counts), kind='stable')[: n - counts.sum()]:
    counts[k] += 1
  if at_least_one:
    for k in range(3):
      if fractions[k] > 0 and counts[k] == 0:
        donor = int(np.argmax(counts))
        if counts[donor] <= 1:
          raise ValueError(f'cannot split {n} users into fractions {fractions}')
        counts[donor] -= 1
        counts[k] += 1
  return counts


def _parts(r: Ratings, masks: Sequence[np.ndarray], kind: str, heldout: bool,
           seed: Optional[int], negatives: Optional[np.ndarray] = None,
           info: Optional[Mapping[str, Any]] = None) -> Split:
  train, val, test = (r.select(m, name=f'{r.name}/{n}')
                      for m, n in zip(masks, ('train', 'val', 'test')))
  return Split(train, val, test, kind, heldout, negatives, seed, dict(info or {}))


def split_by_user(ratings: Ratings, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> Split:
  """Partitions the users: all ratings of a user go to one part."""
  f = _check_fractions(fractions)
  users = ratings.present_users()
  perm = np.random.default_rng(seed).permutation(users)
  n_train, n_val, _ = _allocate(len(users), f, at_least_one=True)
  part = np.full(ratings.num_users, -1, np.int8)
  part[perm[:n_train]] = 0
  part[perm[n_train:n_train + n_val]] = 1
  part[perm[n_train + n_val:]] = 2
  of = part[ratings.users]
  return _parts(ratings, [of == 0, of == 1, of == 2], 'by_user', True, seed)


def _user_positions(r: Ratings) -> tuple[Ratings, np.ndarray, np.ndarray]:
  """Records sorted by (user, time, item); each one's rank and user count."""
  s = r.sorted_by_user()
  offsets = s.user_offsets()
  counts = np.diff(offsets)
  pos = np.arange(s.num_ratings) - offsets[s.users]
  return s, pos, counts[s.users]


def _holdout_counts(spec: Union[int, float], n: np.ndarray, what: str) -> np.ndarray:
  """Per-record number of a user's latest ratings to hold out."""
  if isinstance(spec, (bool, np.bool_)):
    raise ValueError(f'{what} must be an int or a fraction, got {spec!r}')
  if isinstance(spec, (int, np.integer)):
    if spec < 0:
      raise ValueError(f'{what} must be >= 0, got {spec}')
    return np.full(n.shape, int(spec), np.int64)
  if not 0.0 < spec < 1.0:
    raise ValueError(f'{what} as a fraction must be in (0, 1), got {spec}')
  return np.maximum(1, np.round(spec * n)).astype(np.int64)


def _short_users(s: Ratings, short: np.ndarray, policy: str, needed: str) -> np.ndarray:
  """Applies the policy for users with too few ratings; keep-mask."""
  if policy not in SHORT_USER_POLICIES:
    raise ValueError(f'short_users must be one of {SHORT_USER_POLICIES}, got {policy!r}')
  if short.any() and policy == 'error':
    users = np.unique(s.users[short])
    raw = s.user_index.raw_ids[users].tolist()
    raise DataError(f'{s.name}: {len(raw)} user(s) have too few ratings ({needed}), e.g. '
                    f'user {raw[0]}')
  if policy == 'drop':
    return ~short
  return np.ones(s.num_ratings, bool)


def split_by_time(ratings: Ratings, holdout: Union[int, float] = 1,
                  val_holdout: Union[int, float] = 0, *, min_train: int = 1,
                  short_users: str = 'train') -> Split:
  """Per user, the latest ratings go to test (and the ones before to val).

  `holdout` / `val_holdout` are counts per user, or fractions of each user's
  ratings (rounded, at least 1). A user with fewer than
  `holdout + val_holdout + min_train` ratings is a short user: with
  `short_users='train'` all their ratings go to train, with 'drop' they are
  left out of every part, with 'error' they raise DataError.
  """
  s, pos, n = _user_positions(ratings)
  h_test = _holdout_counts(holdout, n, 'holdout')
  h_val = _holdout_counts(val_holdout, n, 'val_holdout') if val_holdout else np.zeros_like(n)
  short = n < h_test + h_val + min_train
  keep = _short_users(s, short, short_users, f'fewer than holdout + val_holdout + {min_train}')
  test = ~short & (pos >= n - h_test)
  val = ~short & ~test & (pos >= n - h_test - h_val)
  train = keep & ~test & ~val
  info = {'holdout': holdout, 'val_holdout': val_holdout, 'short_users': int(
      len(np.unique(s.users[short])))}
  return _parts(s, [train, val, test], 'by_time', False, None, info=info)


def split_random(ratings: Ratings, fractions: Sequence[float] = (0.9, 0.0, 0.1),
                 seed: int = 0) -> Split:
  """Assigns each rating to a part at random (val may be empty)."""
  f = _check_fractions(fractions)
  n_train, n_val, _ = _allocate(ratings.num_ratings, f, at_least_one=False)
  perm = np.random.default_rng(seed).permutation(ratings.num_ratings)
  part = np.empty(ratings.num_ratings, np.int8)
  part[perm[:n_train]] = 0
  part[perm[n_train:n_train + n_val]] = 1
  part[perm[n_train + n_val:]] = 2
  return _parts(ratings, [part == 0, part == 1, part == 2], 'random', False, seed)


def sample_negatives(rng: np.random.Generator, rated: np.ndarray, num_items: int,
                     n: int) -> np.ndarray:
  """`n` distinct items drawn uniformly from those not in `rated`."""
  rated = np.unique(rated)
  free = num_items - len(rated)
  if free < n:
    raise ValueError(f'only {free} unrated items, cannot sample {n} negatives')
  if free < 2 * n or len(rated) > num_items // 2:
    candidates = np.setdiff1d(np.arange(num_items), rated, assume_unique=True)
    return rng.choice(candidates, n, replace=False).astype(np.int32)
  out = np.empty(0, np.int64)
  while len(out) < n:
    draws = rng.integers(num_items, size=2 * n + 8)
    draws = draws[~np.isin(draws, rated)]
    both = np.concatenate([out, draws])
    _, first = np.unique(both, return_index=True)
    out = both[np.sort(first)]
  return out[:n].astype(np.int32)


def split_leave_one_out(ratings: Ratings, num_negatives: int = 99, seed: int = 0, *,
                        with_val: bool = False, short_users: str = 'train') -> Split:
  """Per user the latest rating is test (the one before is val if
  `with_val`); `num_negatives` items the user never rated are sampled
  uniformly, without repetition, for each test rating.

  Users with too few ratings (fewer than 2, or 3 with val) follow
  `short_users` as in `split_by_time`.
  """
  if num_negatives < 0:
    raise ValueError(f'num_negatives must be >= 0, got {num_negatives}')
  s, pos, n = _user_positions(ratings)
  held = 2 if with_val else 1
  short = n < held + 1
  keep = _short_users(s, short, short_users, f'fewer than {held + 1}')
  test = ~short & (pos == n - 1)
  val = ~short & (pos == n - 2) if with_val else np.zeros_like(test)
  train = keep & ~test & ~val
  rng = np.random.default_rng(seed)
  offsets = s.user_offsets()
  test_users = s.users[test]
  negatives = np.empty((len(test_users), num_negatives), np.int32)
  for k, u in enumerate(test_users.tolist()):
    rated = s.items[offsets[u]:offsets[u + 1]]
    try:
      negatives[k] = sample_negatives(rng, rated, s.num_items, num_negatives)
    except ValueError as e:
      raise DataError(f'{s.name}: user {s.user_index.raw_ids[u]}: {e}') from None
  return _parts(s, [train, val, test], 'leave_one_out', False, seed, negatives,
                info={'num_negatives': num_negatives})


ML100K_FOLDS = ('1', '2', '3', '4', '5', 'a', 'b')


def split_ml100k_fold(source: str, fold: Union[int, str],
                      ratings: Optional[Ratings] = None) -> Split:
  """The official ML-100K fold `u{fold}.base` / `u{fold}.test` (fold 1..5,
  or 'a' / 'b'), indexed in the catalog of the full `u.data` (or of
  `ratings`, which must be that data). `source` is a folder or zip holding
  the files. DataError if base and test do not partition `u.data`.
  """
  fold = str(fold)
  if fold not in ML100K_FOLDS:
    raise ValueError(f'ML-100K fold must be one of {", ".join(ML100K_FOLDS)}, got {fold!r}')
  if ratings is None:
    ratings = readers.read_ml100k(readers.locate(source, 'u.data', 'ml-100k'),
                                  checksum=False).ratings
  parts = []
  for suffix in ('base', 'test'):
    path = readers.locate(source, f'u{fold}.{suffix}', 'ml-100k')
    r = readers.read_ml100k(path, name=f'ml-100k/u{fold}.{suffix}', checksum=False).ratings
    try:
      users = ratings.user_index.to_indices(r.user_index.raw_ids[r.users].tolist())
      items = ratings.item_index.to_indices(r.item_index.raw_ids[r.items].tolist())
    except DataError as e:
      raise DataError(f'not in the catalog of {ratings.name}: {e}', path=path) from None
    parts.append(dataclasses.replace(
        r, users=users, items=items, user_index=ratings.user_index,
        item_index=ratings.item_index, name=f'{ratings.name}/u{fold}.{suffix}'))
  base, test = parts
  key = lambda x: x.users.astype(np.int64) * x.num_items + x.items
  kb, kt, kf = key(base), key(test), key(ratings)
  if np.intersect1d(kb, kt).size:
    raise DataError(f'u{fold}.base and u{fold}.test share ratings', path=source)
  if len(kb) + len(kt) != len(kf) or not np.array_equal(np.sort(np.concatenate([kb, kt])),
                                                       np.sort(kf)):
    raise DataError(f'u{fold}.base + u{fold}.test ({len(kb)} + {len(kt)} ratings) do not '
                    f'partition {ratings.name} ({len(kf)} ratings)', path=source)
  empty = ratings.select(np.zeros(0, np.int64), name=f'{ratings.name}/val')
  return Split(base, empty, test, 'ml100k_fold', False, info={'fold': fold})


def make_split(ratings: Optional[Ratings], kind: str, seed: int = 0, **kwargs) -> Split:
  """Dispatches to the split of the given kind (see SPLIT_KINDS).

  'ml100k_fold' takes `source=` and `fold=` (and uses `ratings` as the
  catalog when given).

  Args:
    ratings: The ratings to split.
    kind: One of `SPLIT_KINDS`.
    seed: Seed of the random splits.
    **kwargs: The split function's own arguments (fractions, negatives, ...).

  Returns:
    The `Split`.

  Raises:
    ValueError: An unknown kind or bad arguments.
  """
  if kind == 'by_user':
    return split_by_user(ratings, seed=seed, **kwargs)
  if kind == 'by_time':
    return split_by_time(ratings, **kwargs)
  if kind == 'random':
    return split_random(ratings, seed=seed, **kwargs)
  if kind == 'leave_one_out':
    return split_leave_one_out(ratings, seed=seed, **kwargs)
  if kind == 'ml100k_fold':
    return split_ml100k_fold(ratings=ratings, **kwargs)
  raise ValueError(f'unknown split kind {kind!r}; valid: {", ".join(SPLIT_KINDS)}')
