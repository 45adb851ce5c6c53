"""Tests for tff_rec.data.splits: the invariants of every split."""

import sys
import dataclasses

import numpy as np
import pytest

from tests import shared_data
from tests.data.fixtures import fixture, raw_records
from tff_rec.data import errors
from tff_rec.data import readers
from tff_rec.data import splits
from tff_rec.data import synthetic


@pytest.fixture(scope='module')
def data():
  return synthetic.synthetic_ratings(num_users=120, num_items=300, mean_ratings_per_user=12,
                                     activity_skew=1.0, seed=3).ratings


def with_ties(r):
  """The same records with coarse timestamps, so many ratings tie in time."""
  return dataclasses.replace(r, timestamps=r.timestamps // 20_000_000)


def keys(r) -> np.ndarray:
  return r.users.astype(np.int64) * r.num_items + r.items


def assert_partition(split, original, dropped_users=()):
  """Parts are disjoint, share the catalog, and cover the original records."""
  for _, part in split.parts:
    assert part.user_index is original.user_index or part.user_index == original.user_index
    assert part.item_index == original.item_index
  all_keys = [keys(p) for _, p in split.parts]
  joined = np.concatenate(all_keys)
  assert len(np.unique(joined)) == len(joined), 'parts overlap'
  expected = original.select(~np.isin(original.users, dropped_users))
  assert np.array_equal(np.sort(joined), np.sort(keys(expected))), 'records lost or added'
  assert set().union(*(raw_records(p) for _, p in split.parts)) == raw_records(expected)


def same_split(a, b) -> bool:
  return all(np.array_equal(keys(pa), keys(pb)) for (_, pa), (_, pb) in zip(a.parts, b.parts))


class TestByUser:

  def test_partition_disjoint_users_and_fractions(self, data):
    s = splits.split_by_user(data, (0.8, 0.1, 0.1), seed=1)
    assert s.kind == 'by_user' and s.heldout_users and s.negatives is None
    assert_partition(s, data)
    users = [set(p.present_users().tolist()) for _, p in s.parts]
    assert not users[0] & users[1] and not users[0] & users[2] and not users[1] & users[2]
    assert [len(u) for u in users] == [96, 12, 12]
    for (_, part), u in zip(s.parts, users):  # all ratings of a user in one part
      assert part.num_ratings == int(np.isin(data.users, list(u)).sum())

  def test_determinism(self, data):
    a = splits.split_by_user(data, seed=5)
    assert same_split(a, splits.split_by_user(data, seed=5))
    assert not same_split(a, splits.split_by_user(data, seed=6))

  def test_small_fraction_still_gets_a_user(self, data):
    small = data.for_users(np.arange(5))
    s = splits.split_by_user(small, (0.9, 0.05, 0.05), seed=0)
    assert [len(p.present_users()) for _, p in s.parts] == [3, 1, 1]

  @pytest.mark.parametrize('fractions', [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
  def test_bad_fractions(self, data, fractions):
    with pytest.raises(ValueError, match='fractions'):
      splits.split_by_user(data, fractions)


class TestByTime:

  @pytest.mark.parametrize('tied', [False, True])
  def test_latest_go_to_test_then_val(self, data, tied):
    r = with_ties(data) if tied else data
    s = splits.split_by_time(r, holdout=2, val_holdout=1)
    assert s.kind == 'by_time' and not s.heldout_users
    assert_partition(s, r)
    order = lambda part, u: sorted(zip(part.timestamps[part.users == u].tolist(),
                                       part.items[part.users == u].tolist()))
    counts = np.bincount(r.users, minlength=r.num_users)
    for u in r.present_users().tolist():
      train, val, test = (order(p, u) for _, p in s.parts)
      if counts[u] < 4:
        assert (len(train), len(val), len(test)) == (counts[u], 0, 0)
        continue
      assert (len(val), len(test)) == (1, 2)
      assert train[-1] < val[0] < test[0]  # (time, item) order: ties broken by item

  def test_short_user_policies(self, data):
    counts = np.bincount(data.users, minlength=data.num_users)
    short = np.flatnonzero((counts > 0) & (counts < 3))
    assert short.size  # the skewed activity yields some
    s = splits.split_by_time(data, holdout=2, short_users='train')
    assert set(short) <= set(s.train.present_users()) and not set(short) & set(
        s.test.present_users())
    s = splits.split_by_time(data, holdout=2, short_users='drop')
    assert_partition(s, data, dropped_users=short)
    assert s.info['short_users'] == short.size
    with pytest.raises(errors.DataError, match=f'user {data.user_index.raw_ids[short[0]]}'):
      splits.split_by_time(data, holdout=2, short_users='error')
    with pytest.raises(ValueError, match='short_users'):
      splits.split_by_time(data, short_users='ignore')

  def test_fraction_holdout(self, data):
    s = splits.split_by_time(data, holdout=0.2)
    n = np.bincount(data.users, minlength=data.num_users)
    t = np.bincount(s.test.users, minlength=data.num_users)
    has = n >= 2
    assert np.array_equal(t[has], np.maximum(1, np.round(0.2 * n[has])).astype(int))

  def test_deterministic_without_seed(self, data):
    assert same_split(splits.split_by_time(data), splits.split_by_time(data))


class TestRandom:

  def test_sizes_and_empty_val(self, data):
    s = splits.split_random(data, (0.9, 0.0, 0.1), seed=0)
    n = data.num_ratings
    assert_partition(s, data)
    assert len(s.val) == 0
    assert len(s.test) == round(0.1 * n) and len(s.train) == n - round(0.1 * n)
    s = splits.split_random(data, (0.8, 0.1, 0.1), seed=0)
    assert_partition(s, data)
    assert abs(len(s.val) - 0.1 * n) <= 1 and abs(len(s.test) - 0.1 * n) <= 1

  def test_determinism(self, data):
    a = splits.split_random(data, seed=2)
    assert same_split(a, splits.split_random(data, seed=2))
    assert not same_split(a, splits.split_random(data, seed=3))


class TestLeaveOneOut:

  def test_latest_is_test_and_negatives_never_rated(self, data):
    r = with_ties(data)
    s = splits.split_leave_one_out(r, num_negatives=20, seed=0)
    assert s.kind == 'leave_one_out' and not s.heldout_users
    assert_partition(s, r)
    counts = np.bincount(r.users, minlength=r.num_users)
    assert np.array_equal(np.sort(s.test.users), np.flatnonzero(counts >= 2))
    assert s.negatives.shape == (len(s.test), 20) and s.negatives.dtype == np.int32
    rated = {}
    for u, i in zip(r.users.tolist(), r.items.tolist()):
      rated.setdefault(u, set()).add(i)
    for k, u in enumerate(s.test.users.tolist()):
      row = s.negatives[k].tolist()
      assert len(set(row)) == 20
      assert not set(row) & rated[u]
      assert all(0 <= i < r.num_items for i in row)
      mine = s.train.users == u
      latest = max(zip(s.train.timestamps[mine].tolist(), s.train.items[mine].tolist()))
      assert (int(s.test.timestamps[k]), int(s.test.items[k])) > latest

  def test_with_val_and_determinism(self, data):
    a = splits.split_leave_one_out(data, num_negatives=10, seed=4, with_val=True)
    assert_partition(a, data, dropped_users=())
    assert len(a.val) == len(a.test) == int((np.bincount(data.users) >= 3).sum())
    b = splits.split_leave_one_out(data, num_negatives=10, seed=4, with_val=True)
    c = splits.split_leave_one_out(data, num_negatives=10, seed=5, with_val=True)
    assert same_split(a, b) and np.array_equal(a.negatives, b.negatives)
    assert same_split(a, c) and not np.array_equal(a.negatives, c.negatives)

  def test_too_few_unrated_items_names_the_user(self, data):
    with pytest.raises(errors.DataError, match='user .*unrated items'):
      splits.split_leave_one_out(data, num_negatives=data.num_items - 1)

  def test_sample_negatives_uniform_and_distinct(self):
    rng = np.random.default_rng(0)
    rated = np.array([0, 3, 7])
    freq = np.zeros(20)
    for _ in range(3000):
      neg = splits.sample_negatives(rng, rated, 20, 5)
      assert len(set(neg.tolist())) == 5 and not set(neg.tolist()) & {0, 3, 7}
      freq[neg] += 1
    free = np.setdiff1d(np.arange(20), rated)
    expected = 3000 * 5 / len(free)
    assert np.all(np.abs(freq[free] - expected) < 0.1 * expected)
    dense = splits.sample_negatives(rng, np.arange(15), 20, 5)  # dense path
    assert sorted(dense.tolist()) == [15, 16, 17, 18, 19]


class TestMl100kFold:

  def make_folder(self, tmp_path, base_rows, test_rows):
    lines = open(fixture('u.data')).read().splitlines()
    (tmp_path / 'u.data').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'u1.base').write_text(''.join(lines[k] + '\n' for k in base_rows))
    (tmp_path / 'u1.test').write_text(''.join(lines[k] + '\n' for k in test_rows))
    return str(tmp_path)

  def test_fixture_fold_in_full_catalog(self, tmp_path):
    folder = self.make_folder(tmp_path, [0, 1, 2, 4, 5, 6], [3, 7])
    full = readers.read_ml100k(fixture('u.data')).ratings
    s = splits.split_ml100k_fold(folder, 1)
    assert s.kind == 'ml100k_fold' and s.info['fold'] == '1' and len(s.val) == 0
    assert_partition(s, full)
    assert s.test.user_index == full.user_index  # u1.test lacks user 1, same indices anyway

  def test_not_a_partition(self, tmp_path):
    folder = self.make_folder(tmp_path, [0, 1, 2, 4, 5], [3, 7])
    with pytest.raises(errors.DataError, match='do not partition'):
      splits.split_ml100k_fold(folder, 1)
    folder = self.make_folder(tmp_path, [0, 1, 2, 3, 4, 5, 6], [3, 7])
    with pytest.raises(errors.DataError, match='share ratings'):
      splits.split_ml100k_fold(folder, 1)

  def test_bad_fold(self, tmp_path):
    with pytest.raises(ValueError, match='1, 2, 3, 4, 5, a, b'):
      splits.split_ml100k_fold(str(tmp_path), 6)

  def test_real_folds(self):
    z = shared_data.shared_file('ml-100k.zip')
    full = readers.read_ml100k(z, 'ml-100k/u.data').ratings
    tests = []
    for fold in range(1, 6):
      s = splits.make_split(full, 'ml100k_fold', source=z, fold=fold)
      assert (len(s.train), len(s.test)) == (80_000, 20_000)
      assert s.train.user_index is full.user_index
      tests.append(keys(s.test))
    every = np.concatenate(tests)  # the five test sets partition u.data
    assert np.array_equal(np.sort(every), np.sort(keys(full)))
    s = splits.split_ml100k_fold(z, 'a')
    assert (len(s.train), len(s.test)) == (90_570, 9_430)
    assert np.all(np.bincount(s.test.users) == 10)


class TestSplitAndDispatch:

  def test_make_split(self, data):
    for kind in ('by_user', 'by_time', 'random', 'leave_one_out'):
      s = splits.make_split(data, kind, seed=1)
      assert s.kind == kind
      assert_partition(s, data)
    with pytest.raises(ValueError, match='by_user, by_time, random, leave_one_out, ml100k_fold'):
      splits.make_split(data, 'temporal')

  def test_split_checks(self, data):
    s = splits.split_leave_one_out(data, num_negatives=3)
    other = synthetic.synthetic_ratings(num_users=10, num_items=300, seed=1).ratings
    with pytest.raises(ValueError, match='one catalog'):
      splits.Split(s.train, s.val, other, 'x', False)
    with pytest.raises(ValueError, match='negatives must have shape'):
      splits.Split(s.train, s.val, s.test, 'x', False, negatives=s.negatives[1:])
    assert 'leave_one_out split (train' in s.summary()


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
