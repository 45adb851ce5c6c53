"""Tests for tff_rec.data.synthetic."""

import sys
import numpy as np
import pytest

from tff_rec.data import synthetic


def make(**kwargs):
  args = dict(num_users=300, num_items=200, rank=3, noise_std=0.3, mean_ratings_per_user=15,
              activity_skew=1.0, seed=7)
  args.update(kwargs)
  return synthetic.synthetic_ratings(**args)


def test_shapes_catalog_and_scale():
  d = make()
  r = d.ratings
  assert d.user_factors.shape == (300, 3) and d.item_factors.shape == (200, 3)
  assert (r.num_users, r.num_items) == (300, 200)
  assert r.rating_scale == (1.0, 5.0)
  assert r.ratings.min() >= 1 and r.ratings.max() <= 5
  assert np.all(r.ratings == np.round(r.ratings))  # whole stars by default
  assert np.all(np.bincount(r.users, minlength=300) >= 1)  # every user rates


def test_no_duplicate_pairs_and_increasing_time():
  r = make().ratings
  key = r.users.astype(np.int64) * r.num_items + r.items
  assert len(np.unique(key)) == len(key)
  s = r.sorted_by_user()
  same_user = s.users[1:] == s.users[:-1]
  assert np.all(s.timestamps[1:][same_user] >= s.timestamps[:-1][same_user])


def test_deterministic_by_seed():
  a, b, c = make(seed=1), make(seed=1), make(seed=2)
  for field in ('users', 'items', 'ratings', 'timestamps'):
    np.testing.assert_array_equal(getattr(a.ratings, field), getattr(b.ratings, field))
  np.testing.assert_array_equal(a.user_factors, b.user_factors)
  assert not np.array_equal(a.user_factors, c.user_factors)


def test_ratings_follow_the_low_rank_model():
  d = make(noise_std=0.0, round_to=None)
  r = d.ratings
  np.testing.assert_allclose(r.ratings, d.expected(r.users, r.items), atol=1e-5)
  noisy = make(noise_std=0.3, round_to=None).ratings
  err = noisy.ratings - d.expected(noisy.users, noisy.items)
  assert 0.2 < np.std(err) < 0.35  # the noise (a little less where clipped)
  signal = d.expected(r.users, r.items)
  assert np.std(signal) > 0.5  # the factors carry real signal


def test_activity_skew():
  flat = np.bincount(make(activity_skew=0.0).ratings.users)
  assert np.all(flat == 15)
  skewed = np.bincount(make(activity_skew=1.5).ratings.users)
  assert skewed.max() > 4 * np.median(skewed)
  assert abs(skewed.mean() - 15) < 4


def test_half_stars_and_custom_scale():
  r = make(rating_scale=(0.5, 5.0), round_to=0.5).ratings
  assert r.rating_scale == (0.5, 5.0)
  assert np.all((r.ratings * 2) == np.round(r.ratings * 2))
  assert r.ratings.min() >= 0.5 and len(np.unique(r.ratings)) > 5


def test_item_skew():
  counts = np.bincount(make(item_skew=1.2).ratings.items, minlength=200)
  assert counts.max() > 10 * max(1, np.median(counts))


@pytest.mark.parametrize('kwargs', [
    dict(num_users=0), dict(rank=0), dict(mean_ratings_per_user=0.5),
    dict(mean_ratings_per_user=500), dict(noise_std=-1), dict(rating_scale=(5, 1)),
    dict(round_to=0),
])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    make(**kwargs)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
