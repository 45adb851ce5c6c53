"""The PFedRec protocol: the split, its evaluation negatives, and the two training-negative pools."""

import sys
import numpy as np
import pytest

from tff_rec.data import errors
from tff_rec.data import fedrec_protocol as fp
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import synthetic


@pytest.fixture(scope='module')
def ratings():
  return synthetic.clustered_interactions(num_users=30, num_items=200, num_clusters=4,
                                          per_user=25, seed=1)


@pytest.fixture(scope='module')
def data(ratings):
  return fp.fedrec_split(ratings, seed=0, num_eval_negatives=20)


def _by_user(r):
  out = {}
  for u, i, t in zip(r.users.tolist(), r.items.tolist(), r.timestamps.tolist()):
    out.setdefault(u, []).append((t, i))
  return {u: [i for _, i in sorted(v)] for u, v in out.items()}


def test_leave_one_out_by_time(ratings, data):
  history = _by_user(ratings)
  for u in range(data.num_users):
    h = history[u]
    assert data.test_items[u] == h[-1]
    assert data.val_items[u] == h[-2]
    assert data.train_items_of(u).tolist() == h[:-2]
  assert data.train_items.size == ratings.num_ratings - 2 * data.num_users


def test_eval_negatives_distinct_disjoint_and_unrated(ratings, data):
  history = _by_user(ratings)
  for u in range(data.num_users):
    both = np.concatenate([data.val_negatives[u], data.test_negatives[u]])
    assert len(set(both.tolist())) == both.size == 40
    assert not set(both.tolist()) & set(history[u])
  again = fp.fedrec_split(ratings, seed=0, num_eval_negatives=20)
  np.testing.assert_array_equal(again.test_negatives, data.test_negatives)
  other = fp.fedrec_split(ratings, seed=1, num_eval_negatives=20)
  assert not np.array_equal(other.test_negatives, data.test_negatives)


def test_as_published_never_draws_held_out_items_leak_free_does(data):
  rng = np.random.default_rng(0)
  hits = {'as_published': 0, 'leak_free': 0}
  for protocol in fp.PROTOCOLS:
    for _ in range(20):
      neg = fp.sample_training_negatives(data, protocol, rng, per_positive=4)
      users = data.train_users
      assert neg.shape == (data.train_items.size, 4)
      # Distinct within a positive's draws, never a training item of the user.
      assert (np.sort(neg, axis=1)[:, 1:] != np.sort(neg, axis=1)[:, :-1]).all()
      for u in range(data.num_users):
        own = set(data.train_items_of(u).tolist())
        assert not own & set(neg[users == u].ravel().tolist())
      held = (neg == data.val_items[users][:, None]) | (neg == data.test_items[users][:, None])
      hits[protocol] += int(held.sum())
  assert hits['as_published'] == 0
  # leak_free: about 2 / 177 of 20 x 690 x 4 draws are held-out items.
  assert hits['leak_free'] > 100


def test_excluded_pools(data):
  off, items = data.excluded('as_published')
  off_lf, items_lf = data.excluded('leak_free')
  for u in range(data.num_users):
    ap = set(items[off[u]:off[u + 1]].tolist())
    lf = set(items_lf[off_lf[u]:off_lf[u + 1]].tolist())
    assert ap == lf | {int(data.val_items[u]), int(data.test_items[u])}
  with pytest.raises(ValueError, match='unknown protocol'):
    data.excluded('leaky')


def test_round_examples(data):
  ex = fp.round_examples(data, 'leak_free', np.random.default_rng(3), per_positive=4)
  assert ex.items.size == 5 * data.train_items.size
  for k, u in enumerate(ex.users.tolist()):
    items, labels = ex.of(k)
    assert sorted(items[labels == 1].tolist()) == sorted(data.train_items_of(u).tolist())
    assert (labels == 0).sum() == 4 * data.train_counts[u]
  some = fp.round_examples(data, 'leak_free', np.random.default_rng(3), users=np.array([5, 2]))
  assert some.users.tolist() == [2, 5]


def test_bad_input_is_named():
  r = synthetic.clustered_interactions(num_users=4, num_items=40, num_clusters=2, per_user=3,
                                       seed=0)
  short = r.select(~((r.users == 2) & (r.timestamps == r.timestamps[r.users == 2].max())))
  with pytest.raises(errors.DataError, match='user 2 has 2 interaction'):
    fp.fedrec_split(short, num_eval_negatives=5)
  dup = ratings_lib.Ratings(
      users=np.r_[r.users, 0], items=np.r_[r.items, r.items[0]], ratings=np.r_[r.ratings, 1.0],
      timestamps=np.r_[r.timestamps, 5], user_index=r.user_index, item_index=r.item_index,
      name='dup')
  with pytest.raises(errors.DataError, match='twice'):
    fp.fedrec_split(dup, num_eval_negatives=5)
  with pytest.raises(errors.DataError, match='cannot sample'):
    fp.fedrec_split(r, num_eval_negatives=30)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
