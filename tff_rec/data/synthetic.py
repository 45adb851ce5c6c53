"""Synthetic explicit ratings from a known low-rank model, for tests.

rating(u, i) = clip(round(center + <p_u, q_i> + noise)), with `center` the
middle of the rating scale, factor entries drawn N(0, 1/sqrt(rank)) (so the
signal has about unit variance) and noise N(0, noise_std). Users rate a
skewed number of distinct items (lognormal activity; each user >= 1 rating).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tff_rec.data import ratings as ratings_lib


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticData:
  """Generated ratings and the model that generated them.

  Attributes:
    ratings: the observed records (catalog: all users and all items).
    user_factors: `[num_users, rank]` true user factors p_u.
    item_factors: `[num_items, rank]` true item factors q_i.
    center: the offset added to every score.
  """

  ratings: ratings_lib.Ratings
  user_factors: np.ndarray
  item_factors: np.ndarray
  center: float

  def expected(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Noise-free scores of (user, item) pairs, clipped to the scale."""
    score = self.center + np.sum(self.user_factors[users] * self.item_factors[items], axis=-1)
    low, high = self.ratings.rating_scale
    return np.clip(score, low, high)


def _round(x: np.ndarray, low: float, step: Optional[float]) -> np.ndarray:
  if step is None:
    return x
  return low + np.round((x - low) / step) * step


def synthetic_ratings(
    num_users: int = 100,
    num_items: int = 50,
    rank: int = 4,
    noise_std: float = 0.5,
    mean_ratings_per_user: float = 10.0,
    activity_skew: float = 1.0,
    seed: int = 0,
    rating_scale: tuple[float, float] = (1.0, 5.0),
    round_to: Optional[float] = 1.0,
    item_skew: float = 0.0,
) -> SyntheticData:
  """Low-rank ratings plus Gaussian noise, deterministic by `seed`.

  Args:
    num_users, num_items, rank: sizes of the model.
    noise_std: standard deviation of the Gaussian noise on each rating.
    mean_ratings_per_user: target mean number of ratings per user.
    activity_skew: lognormal sigma of per-user activity (0: all equal).
    seed: seed of `np.random.default_rng`.
    rating_scale: (low, high); ratings are clipped to it.
    round_to: rating step (1.0 stars, 0.5 half stars, None continuous).
    item_skew: Zipf exponent of item popularity (0: uniform).
  """
  if num_users <= 0 or num_items <= 0 or rank <= 0:
    raise ValueError('num_users, num_items and rank must be positive')
  if not 1.0 <= mean_ratings_per_user <= num_items:
    raise ValueError(f'mean_ratings_per_user must be in [1, num_items={num_items}], '
                     f'got {mean_ratings_per_user}')
  if noise_std < 0 or activity_skew < 0 or item_skew < 0:
    raise ValueError('noise_std, activity_skew and item_skew must be >= 0')
  low, high = float(rating_scale[0]), float(rating_scale[1])
  if not low < high:
    raise ValueError(f'rating_scale must be (low, high) with low < high, got {rating_scale}')
  if round_to is not None and round_to <= 0:
    raise ValueError(f'round_to must be positive or None, got {round_to}')

  rng = np.random.default_rng(seed)
  scale = 1.0 / np.sqrt(np.sqrt(rank))
  user_factors = rng.normal(0.0, scale, (num_users, rank))
  item_factors = rng.normal(0.0, scale, (num_items, rank))
  center = (low + high) / 2.0

  weights = rng.lognormal(0.0, activity_skew, num_users) if activity_skew else np.ones(num_users)
  counts = np.clip(np.round(weights * mean_ratings_per_user / weights.mean()), 1, num_items)
  counts = counts.astype(np.int64)
  popularity = 1.0 / np.arange(1, num_items + 1) ** item_skew
  popularity = rng.permutation(popularity / popularity.sum())

  users = np.repeat(np.arange(num_users), counts)
  items = np.concatenate([
      rng.choice(num_items, size=c, replace=False, p=popularity) for c in counts.tolist()])
  score = center + np.sum(user_factors[users] * item_factors[items], axis=1)
  noisy = score + rng.normal(0.0, noise_std, len(users)) if noise_std else score
  values = np.clip(_round(noisy, low, round_to), low, high)
  stamps = np.concatenate([np.sort(rng.integers(1_000_000_000, 1_100_000_000, c))
                           for c in counts.tolist()])
  r = ratings_lib.Ratings(
      users=users, items=items, ratings=values, timestamps=stamps,
      user_index=ratings_lib.IdIndex.from_raw(str(u) for u in range(num_users)),
      item_index=ratings_lib.IdIndex.from_raw(str(i) for i in range(num_items)),
      rating_scale=(low, high), name=f'synthetic-{seed}',
  )
  return SyntheticData(r, user_factors, item_factors, center)


def clustered_interactions(num_users: int = 60, num_items: int = 120, *, num_clusters: int = 4,
                           per_user: int = 20, in_cluster: float = 0.9,
                           seed: int = 0) -> ratings_lib.Ratings:
  """Implicit feedback with structure a recommender can learn, for tests.

  Items are split into `num_clusters` equal groups and user u belongs to
  group `u % num_clusters`; each user interacts with `per_user` distinct
  items, each from its own group with probability `in_cluster` and uniform
  otherwise, at distinct increasing timestamps in random order. All ratings
  are 1.
  """
  if not 0 < num_clusters <= num_items or num_items % num_clusters:
    raise ValueError(f'num_items ({num_items}) must split into num_clusters ({num_clusters}) groups')
  size = num_items // num_clusters
  if not 0 < per_user <= size:
    raise ValueError(f'per_user must be in [1, {size}], got {per_user}')
  if not 0.0 <= in_cluster <= 1.0:
    raise ValueError(f'in_cluster must be in [0, 1], got {in_cluster}')
  rng = np.random.default_rng(seed)
  users, items = [], []
  for u in range(num_users):
    group = np.arange(size) + (u % num_clusters) * size
    chosen: list[int] = []
    while len(chosen) < per_user:
      i = int(rng.choice(group)) if rng.random() < in_cluster else int(rng.integers(num_items))
      if i not in chosen:
        chosen.append(i)
    users += [u] * per_user
    items += chosen
  stamps = np.concatenate([1_000_000_000 + rng.permutation(per_user) for _ in range(num_users)])
  return ratings_lib.Ratings(
      users=np.array(users), items=np.array(items), ratings=np.ones(len(users), np.float32),
      timestamps=stamps, user_index=ratings_lib.IdIndex.from_raw(str(u) for u in range(num_users)),
      item_index=ratings_lib.IdIndex.from_raw(str(i) for i in range(num_items)),
      rating_scale=(1.0, 1.0), name=f'clustered-{seed}')
