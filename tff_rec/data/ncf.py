"""The NCF paper's leave-one-out split of ML-1M (He et al., WWW 2017), as is.

Files (ids are 0-based already and used as dense indices):
  `ml-1m.train.rating`: tab-separated user, item, rating, timestamp;
  `ml-1m.test.rating`: each user's latest rating, same format;
  `ml-1m.test.negative`: per user `(user,item)` then the sampled negatives.

Checked: every id is a non-negative integer below the declared (or derived)
counts, each user has exactly one test rating not also in train, and one
negatives line with exactly `num_negatives` items, none rated in train. The
published negatives sometimes include the user's own test item; this is kept
(as in the paper's evaluation) and counted in `Split.info`.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import numpy as np

from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import readers
from tff_rec.data import splits

DataError = errors.DataError

_PAIR_RE = re.compile(r'\((\d+),(\d+)\)')

_log = logging.getLogger(__name__)


def _check_once(users: np.ndarray, num_users: int, path: str, lines: np.ndarray) -> None:
  """DataError at the second line of a repeated user, or naming a missing one."""
  order = np.argsort(users, kind='stable')
  dup = np.flatnonzero(users[order][1:] == users[order][:-1])
  if dup.size:
    k = int(min(order[d + 1] for d in dup))
    raise DataError(f'user {int(users[k])} appears twice', path=path, line=int(lines[k]))
  missing = np.setdiff1d(np.arange(num_users), users)
  if missing.size:
    raise DataError(f'{missing.size} user(s) have no line, e.g. user {int(missing[0])}', path=path)


def _read_negatives(path: str, num_negatives: int, num_users: int,
                    num_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(users, test items, negatives [n, N], line numbers) of a negatives file."""
  text = readers.read_bytes(path).decode('utf-8', 'replace')
  rows = text.split('\n')
  if rows and rows[-1] == '':
    rows.pop()
  users, items, lines = [], [], []
  negatives = np.empty((len(rows), num_negatives), np.int64)
  for n, row in enumerate(rows):
    line = n + 1
    fields = row.rstrip('\r').split('\t')
    m = _PAIR_RE.fullmatch(fields[0])
    if m is None:
      raise DataError(f'expected "(user,item)" first, got {fields[0][:60]!r}', path=path, line=line)
    if len(fields) - 1 != num_negatives:
      raise DataError(f'expected {num_negatives} negatives, got {len(fields) - 1}',
                      path=path, line=line)
    try:
      negatives[n] = [int(x) for x in fields[1:]]
    except ValueError:
      bad = next(x for x in fields[1:] if not x.isdigit())
      raise DataError(f'negative item {bad[:40]!r} is not a non-negative integer',
                      path=path, line=line) from None
    users.append(int(m.group(1)))
    items.append(int(m.group(2)))
    lines.append(line)
  if not rows:
    raise DataError('no lines', path=path)
  users_a, items_a = np.array(users, np.int64), np.array(items, np.int64)
  lines_a = np.array(lines, np.int64)
  readers.check_ids_in_range(users_a, num_users, path=path, lines=lines_a, what='user id')
  readers.check_ids_in_range(items_a, num_items, path=path, lines=lines_a, what='item id')
  bad_row = np.flatnonzero(((negatives < 0) | (negatives >= num_items)).any(axis=1))
  if bad_row.size:
    k = int(bad_row[0])
    v = negatives[k][(negatives[k] < 0) | (negatives[k] >= num_items)][0]
    raise DataError(f'negative item id {int(v)} out of range [0, {num_items})',
                    path=path, line=int(lines_a[k]))
  return users_a, items_a, negatives, lines_a


def read_ncf(source: str, prefix: str = 'ml-1m', *, num_negatives: int = 99,
             num_users: Optional[int] = None, num_items: Optional[int] = None) -> splits.Split:
  """The NCF split in a folder or zip (e.g. `ncf-ml-1m.zip`) as a `Split`.

  `kind='ncf_leave_one_out'`, val empty, `negatives` `[num_users, N]` in the
  order of `test` (sorted by user). The catalog has `num_users` x
  `num_items` ids `'0'..` (default: one past the largest id in the rating
  files); any id outside it is a DataError naming the file and line.
  """
  train_path = readers.locate(source, f'{prefix}.train.rating')
  test_path = readers.locate(source, f'{prefix}.test.rating')
  neg_path = readers.locate(source, f'{prefix}.test.negative')
  train = readers.parse_records(train_path, scale=readers.STARS)
  test = readers.parse_records(test_path, scale=readers.STARS)
  n_users = num_users
  if n_users is None:
    n_users = int(max(train.users.max(), test.users.max())) + 1
  n_items = num_items
  if n_items is None:
    n_items = int(max(train.items.max(), test.items.max())) + 1
  for parsed in (train, test):
    readers.check_ids_in_range(parsed.users, n_users, path=parsed.source, lines=parsed.lines,
                               what='user id')
    readers.check_ids_in_range(parsed.items, n_items, path=parsed.source, lines=parsed.lines,
                               what='item id')
  _check_once(test.users, n_users, test.source, test.lines)

  train_keys = train.users * n_items + train.items
  dup = np.flatnonzero(np.diff(np.sort(train_keys)) == 0)
  if dup.size:
    key = np.sort(train_keys)[dup[0]]
    k = int(np.flatnonzero(train_keys == key)[1])
    raise DataError(f'duplicate rating of item {int(train.items[k])} by user '
                    f'{int(train.users[k])}', path=train.source, line=int(train.lines[k]))
  train_set = np.sort(train_keys)
  test_keys = test.users * n_items + test.items
  in_train = np.isin(test_keys, train_set)
  if in_train.any():
    k = int(np.flatnonzero(in_train)[0])
    raise DataError(f'test rating of user {int(test.users[k])} on item {int(test.items[k])} '
                    'is also in the training file', path=test.source, line=int(test.lines[k]))

  neg_users, neg_items, negatives, neg_lines = _read_negatives(
      neg_path, num_negatives, n_users, n_items)
  _check_once(neg_users, n_users, neg_path, neg_lines)
  test_item_of = np.empty(n_users, np.int64)
  test_item_of[test.users] = test.items
  wrong = np.flatnonzero(test_item_of[neg_users] != neg_items)
  if wrong.size:
    k = int(wrong[0])
    raise DataError(f'pair ({int(neg_users[k])},{int(neg_items[k])}) differs from the test '
                    f'rating of user {int(neg_users[k])} (item {int(test_item_of[neg_users[k]])})',
                    path=neg_path, line=int(neg_lines[k]))
  rated = np.isin(neg_users[:, None] * n_items + negatives, train_set)
  if rated.any():
    k = int(np.flatnonzero(rated.any(axis=1))[0])
    item = int(negatives[k][rated[k]][0])
    raise DataError(f'negative item {item} of user {int(neg_users[k])} is rated in training',
                    path=neg_path, line=int(neg_lines[k]))
  test_item_in_negatives = int((negatives == neg_items[:, None]).any(axis=1).sum())
  if test_item_in_negatives:
    _log.info('%s: %d users have their test item among the negatives (kept as published)',
              neg_path, test_item_in_negatives)

  user_index = ratings_lib.IdIndex.from_raw(str(i) for i in range(n_users))
  item_index = ratings_lib.IdIndex.from_raw(str(i) for i in range(n_items))

  def to_ratings(parsed, name: str) -> ratings_lib.Ratings:
    return ratings_lib.Ratings(
        users=parsed.users, items=parsed.items, ratings=parsed.ratings.astype(np.float32),
        timestamps=parsed.timestamps, user_index=user_index, item_index=item_index,
        rating_scale=readers.STARS.as_tuple(), name=name)

  train_r = to_ratings(train, f'ncf-{prefix}/train')
  test_r = to_ratings(test, f'ncf-{prefix}/test')
  order = np.argsort(test.users, kind='stable')
  test_r = test_r.select(order)
  neg_by_user = np.empty((n_users, num_negatives), np.int32)
  neg_by_user[neg_users] = negatives
  val_r = train_r.select(np.zeros(0, np.int64), name=f'ncf-{prefix}/val')
  return splits.Split(
      train_r, val_r, test_r, 'ncf_leave_one_out', False,
      negatives=neg_by_user[test_r.users],
      info={'source': source, 'num_negatives': num_negatives,
            'test_item_in_negatives': test_item_in_negatives},
  )
