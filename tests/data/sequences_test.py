"""Sequential split: time order with item-id ties, held-out items, negatives, no leakage."""

import sys
import os

import numpy as np
import pytest

from tests import shared_data
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import sequences
from tff_rec.data import sources


def _ratings(records, num_users=None, num_items=None):
  """Ratings from (user, item, timestamp) triples of raw ids."""
  users = [str(u) for u, _, _ in records]
  items = [str(i) for _, i, _ in records]
  uidx = ratings_lib.IdIndex.from_raw(users)
  iidx = ratings_lib.IdIndex.from_raw(items)
  return ratings_lib.Ratings(
      users=uidx.to_indices(users), items=iidx.to_indices(items),
      ratings=np.ones(len(records)), timestamps=[t for _, _, t in records],
      user_index=uidx, item_index=iidx, name='toy')


def _raw(split, ids):
  return [split.item_index.raw_ids[i - 1] for i in ids]


def test_time_order_with_ties_broken_by_item_id_and_last_two_held_out():
  # User 1: items 30 (t=5), 10 and 20 tied at t=3, 40 (t=9), 50 (t=1). Order: 50, 10, 20, 30, 40.
  records = [(1, 30, 5), (1, 20, 3), (1, 10, 3), (1, 40, 9), (1, 50, 1),
             (2, 10, 1), (2, 20, 2), (3, 60, 1), (3, 70, 1)]
  split = sequences.split_sequences(_ratings(records), min_actions=None, num_negatives=1)
  u1 = split.user_index.index_of('1')
  assert _raw(split, split.train[u1]) == ['50', '10', '20']
  assert _raw(split, [split.valid[u1]]) == ['30']
  assert _raw(split, [split.test[u1]]) == ['40']
  # Fewer than 3 actions: everything is training, nothing is ranked.
  u2 = split.user_index.index_of('2')
  assert _raw(split, split.train[u2]) == ['10', '20']
  assert split.valid[u2] == 0 and split.test[u2] == 0
  assert split.evaluated_users.tolist() == [u1]
  assert split.history(u1, for_test=True).tolist() == split.train[u1].tolist() + [split.valid[u1]]


def _random_ratings(seed=0, users=60, items=80):
  rng = np.random.default_rng(seed)
  records = []
  for u in range(users):
    chosen = rng.choice(items, size=rng.integers(8, 30), replace=False)
    for item in chosen:
      records.append((u, item, int(rng.integers(0, 50))))  # many timestamp ties
  return _ratings(records)


def test_negatives_are_distinct_unrated_items_and_held_out_items_never_leak():
  r = _random_ratings()
  split = sequences.split_sequences(r, seed=3, num_negatives=20)
  for u in split.evaluated_users:
    rated = set(split.train[u].tolist()) | {int(split.valid[u]), int(split.test[u])}
    assert int(split.test[u]) not in split.train[u]
    assert int(split.valid[u]) not in split.train[u]
    for negs in (split.valid_negatives[u], split.test_negatives[u]):
      assert len(set(negs.tolist())) == 20
      assert not set(negs.tolist()) & rated
      assert negs.min() >= 1 and negs.max() <= split.num_items
  again = sequences.split_sequences(r, seed=3, num_negatives=20)
  np.testing.assert_array_equal(split.test_negatives, again.test_negatives)


def test_eval_windows_end_with_the_right_history():
  split = sequences.split_sequences(_random_ratings(), num_negatives=5)
  windows, candidates, users = sequences.eval_inputs(split, 6, which='test')
  for w, c, u in zip(windows, candidates, users):
    hist = split.history(u, for_test=True)
    assert w[-1] == split.valid[u] and c[0] == split.test[u]
    assert w.tolist() == hist[-6:].tolist()
  windows, candidates, users = sequences.eval_inputs(split, 500, which='valid')
  for w, c, u in zip(windows, candidates, users):
    n = len(split.train[u])
    assert w[-n:].tolist() == split.train[u].tolist() and not w[:-n].any()
    assert c[0] == split.valid[u]
  with pytest.raises(ValueError, match='which'):
    sequences.eval_inputs(split, 5, which='train')


def test_five_core_is_one_pass_over_raw_counts():
  # Item 99 has 1 action (dropped); user 3 has 5 actions, one on item 99, so keeps 4.
  records = [(u, i, i) for u in (1, 2, 3, 4, 5) for i in (1, 2, 3, 4)]
  records += [(3, 99, 100), (1, 5, 50), (2, 5, 50), (4, 5, 50), (5, 5, 50), (6, 1, 1)]
  out = sequences.five_core(_ratings(records))
  assert '99' not in out.item_index and '6' not in out.user_index
  assert np.sum(out.users == out.user_index.index_of('3')) == 4


def test_left_padded():
  assert sequences.left_padded(np.array([1, 2, 3]), 5).tolist() == [0, 0, 1, 2, 3]
  assert sequences.left_padded(np.array([1, 2, 3]), 2).tolist() == [2, 3]
  assert sequences.left_padded(np.array([], np.int32), 2).tolist() == [0, 0]


@pytest.mark.parametrize('name,users,items', [
    ('ml-100k', 943, 1349), ('ml-latest-small', 610, 3650)])
def test_real_movielens(name, users, items):
  data_dir = os.path.dirname(shared_data.shared_file(f'{name}.zip'))
  r, _ = sources.load_movielens(name, data_dir=data_dir)
  split = sequences.split_sequences(r)
  assert (split.num_users, split.num_items) == (users, items)
  assert split.evaluated_users.size == users
  assert split.summary()['actions'] == sum(len(s) for s in split.train) + 2 * users



def test_hold_out_items_removes_them_from_training_only():
  split = sequences.split_sequences(_random_ratings(), num_negatives=5)
  cold = sequences.hold_out_items(split, fraction=0.25, seed=2)
  assert cold.cold_items.size == round(0.25 * split.num_items)
  for before, after in zip(split.train, cold.train):
    assert not np.isin(after, cold.cold_items).any()
    assert after.tolist() == [i for i in before.tolist() if i not in set(cold.cold_items.tolist())]
  np.testing.assert_array_equal(cold.test, split.test)
  np.testing.assert_array_equal(cold.test_negatives, split.test_negatives)
  is_cold = np.isin(cold.test, cold.cold_items)
  assert set(cold.users_by_test_item(cold=True)) == set(np.flatnonzero(is_cold & (cold.test > 0)))
  assert set(cold.users_by_test_item(cold=False)) | set(cold.users_by_test_item(cold=True)) == set(
      cold.evaluated_users)
  with pytest.raises(ValueError, match='already has'):
    sequences.hold_out_items(cold)
  with pytest.raises(ValueError, match='fraction'):
    sequences.hold_out_items(split, fraction=1.0)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
