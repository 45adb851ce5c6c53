"""Loads a data set and splits it, from one config (shared by all binaries)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tff_rec.data import ncf
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import sources
from tff_rec.data import splits
from tff_rec.data import synthetic

DATASETS = ('ml-100k', 'ml-1m', 'ml-10m', 'ml-20m', 'ml-25m', 'ml-latest-small', 'ml-latest',
            'ncf-ml-1m', 'synthetic')

# `--dataset=synthetic`: small low-rank ratings for smoke tests and demos.
SYNTHETIC_SHAPE = dict(num_users=120, num_items=60, rank=4, noise_std=0.3,
                       mean_ratings_per_user=20.0, activity_skew=1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which ratings, and how they are split."""

  dataset: str = 'ml-100k'
  data_dir: Optional[str] = None
  cache_dir: Optional[str] = None
  split: str = 'random'
  val_fraction: float = 0.0
  test_fraction: float = 0.1
  max_users: Optional[int] = None  # keep the first N users (by raw id order)
  num_negatives: int = 99  # leave_one_out
  fold: int = 1  # ml100k_fold
  seed: int = 0

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f'unknown dataset {self.dataset!r}; valid: {", ".join(DATASETS)}')
    if self.split not in splits.SPLIT_KINDS:
      raise ValueError(f'unknown split {self.split!r}; valid: {", ".join(splits.SPLIT_KINDS)}')
    if not 0 <= self.val_fraction < 1 or not 0 < self.test_fraction < 1:
      raise ValueError('val_fraction must be in [0, 1) and test_fraction in (0, 1)')
    if self.val_fraction + self.test_fraction >= 1:
      raise ValueError('val_fraction + test_fraction must be below 1')
    if self.max_users is not None and self.max_users <= 0:
      raise ValueError(f'max_users must be positive, got {self.max_users}')

  @property
  def fractions(self) -> tuple[float, float, float]:
    return (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)


def first_users(r: ratings_lib.Ratings, n: int) -> ratings_lib.Ratings:
  """The ratings of the first `n` users (dense index order), same catalog."""
  if n >= r.num_users:
    return r
  return r.select(r.users < n, name=r.name)


def load_ratings(config: DataConfig) -> ratings_lib.Ratings:
  """The full ratings of the configured data set."""
  if config.dataset == 'synthetic':
    return synthetic.synthetic_ratings(seed=config.seed, **SYNTHETIC_SHAPE).ratings
  ratings, _ = sources.load_movielens(config.dataset, data_dir=config.data_dir, cache_dir=config.cache_dir)
  return ratings


def load_split(config: DataConfig) -> splits.Split:
  """The configured split, deterministic from `config.seed`."""
  if config.dataset == 'ncf-ml-1m':
    if config.data_dir is None:
      raise ValueError('ncf-ml-1m needs --data_dir pointing at the NCF files (ncf-ml-1m.zip)')
    return ncf.read_ncf(config.data_dir)
  if config.split == 'ml100k_fold':
    if config.dataset != 'ml-100k' or config.data_dir is None:
      raise ValueError('the ml100k_fold split needs --dataset=ml-100k and --data_dir with u1..u5 files')
    return splits.split_ml100k_fold(config.data_dir, config.fold)
  ratings = load_ratings(config)
  if config.max_users is not None:
    ratings = first_users(ratings, config.max_users)
  kwargs = {}
  if config.split in ('by_user', 'random'):
    kwargs['fractions'] = config.fractions
  elif config.split == 'leave_one_out':
    kwargs['num_negatives'] = config.num_negatives
  return splits.make_split(ratings, config.split, seed=config.seed, **kwargs)
