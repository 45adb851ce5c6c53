"""Rating records with dense 0-based user and item indices and their raw ids."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from tff_rec import atomic
from tff_rec.data import errors


@dataclasses.dataclass(frozen=True, eq=False)
class IdIndex:
  """A bijection between raw ids (strings) and dense indices 0..n-1."""

  raw_ids: np.ndarray  # index -> raw id, dtype object (str)

  def __post_init__(self):
    raw = np.asarray(self.raw_ids, dtype=object)
    object.__setattr__(self, 'raw_ids', raw)
    lookup = {r: i for i, r in enumerate(raw.tolist())}
    if len(lookup) != len(raw):
      raise ValueError('IdIndex raw ids must be unique.')
    object.__setattr__(self, '_lookup', lookup)

  @classmethod
  def from_raw(cls, raw_ids: Iterable[str]) -> 'IdIndex':
    """Index of the distinct raw ids, ordered numerically when all are ints."""
    distinct = set(str(r) for r in raw_ids)
    if all(_is_int(r) for r in distinct):
      ordered = sorted(distinct, key=int)
    else:
      ordered = sorted(distinct)
    return cls(np.array(ordered, dtype=object))

  def __len__(self) -> int:
    return len(self.raw_ids)

  def __eq__(self, other) -> bool:
    return isinstance(other, IdIndex) and self.raw_ids.tolist() == other.raw_ids.tolist()

  def __contains__(self, raw_id: str) -> bool:
    return str(raw_id) in self._lookup

  def index_of(self, raw_id: str) -> int:
    """The dense index of one raw id; DataError if unknown."""
    try:
      return self._lookup[str(raw_id)]
    except KeyError:
      raise errors.DataError(f'unknown id {raw_id!r}') from None

  def to_indices(self, raw_ids: Sequence[str]) -> np.ndarray:
    """Dense indices (int32) of raw ids; DataError naming the first unknown."""
    lookup = self._lookup
    out = np.empty(len(raw_ids), dtype=np.int32)
    for n, r in enumerate(raw_ids):
      i = lookup.get(str(r))
      if i is None:
        raise errors.DataError(f'unknown id {r!r} at position {n}')
      out[n] = i
    return out

  def to_raw(self, indices: Union[np.ndarray, Sequence[int]]) -> np.ndarray:
    """Raw ids of dense indices; DataError if an index is out of range."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise errors.DataError(
          f'index out of range [0, {len(self)}): {int(idx.min())}..{int(idx.max())}'
      )
    return self.raw_ids[idx]

  def save(self, path: str) -> None:
    """Writes the raw ids, one per line in index order, atomically."""
    lines = []
    for r in self.raw_ids.tolist():
      if '\n' in r:
        raise ValueError(f'raw id {r!r} contains a newline')
      lines.append(r + '\n')
    atomic.write(path, ''.join(lines))

  @classmethod
  def load(cls, path: str) -> 'IdIndex':
    if not os.path.exists(path):
      raise errors.DataError('id mapping file not found', path=path)
    with open(path, encoding='utf-8') as f:
      raw = [line.rstrip('\n') for line in f]
    return cls(np.array(raw, dtype=object))


def _is_int(s: str) -> bool:
  try:
    int(s)
    return True
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class Ratings:
  """Rating records over a fixed user and item catalog.

  `users[k]`, `items[k]`, `ratings[k]`, `timestamps[k]` describe record k.
  The indices are dense positions in `user_index` / `item_index`; subsets of a
  data set share the catalog of the whole, so indices stay comparable.
  """

  users: np.ndarray  # int32
  items: np.ndarray  # int32
  ratings: np.ndarray  # float32
  timestamps: np.ndarray  # int64
  user_index: IdIndex
  item_index: IdIndex
  rating_scale: tuple[float, float] = (1.0, 5.0)
  name: str = 'ratings'

  def __post_init__(self):
    object.__setattr__(self, 'users', np.asarray(self.users, dtype=np.int32))
    object.__setattr__(self, 'items', np.asarray(self.items, dtype=np.int32))
    object.__setattr__(self, 'ratings', np.asarray(self.ratings, dtype=np.float32))
    object.__setattr__(
        self, 'timestamps', np.asarray(self.timestamps, dtype=np.int64)
    )
    n = len(self.users)
    for field in ('items', 'ratings', 'timestamps'):
      if len(getattr(self, field)) != n:
        raise ValueError(f'Ratings.{field} has length {len(getattr(self, field))}, expected {n}')
    if n:
      if self.users.min() < 0 or self.users.max() >= len(self.user_index):
        raise errors.DataError(f'{self.name}: user index out of range [0, {len(self.user_index)})')
      if self.items.min() < 0 or self.items.max() >= len(self.item_index):
        raise errors.DataError(f'{self.name}: item index out of range [0, {len(self.item_index)})')

  @property
  def num_ratings(self) -> int:
    return len(self.users)

  @property
  def num_users(self) -> int:
    """Size of the user catalog (not only the users present here)."""
    return len(self.user_index)

  @property
  def num_items(self) -> int:
    """Size of the item catalog (not only the items present here)."""
    return len(self.item_index)

  def __len__(self) -> int:
    return self.num_ratings

  def present_users(self) -> np.ndarray:
    """Sorted dense indices of users with at least one record here."""
    return np.unique(self.users)

  def select(self, where: np.ndarray, name: Optional[str] = None) -> 'Ratings':
    """The records at a boolean mask or integer positions, same catalog."""
    return dataclasses.replace(
        self,
        users=self.users[where],
        items=self.items[where],
        ratings=self.ratings[where],
        timestamps=self.timestamps[where],
        name=name or self.name,
    )

  def for_users(self, user_indices: np.ndarray, name: Optional[str] = None) -> 'Ratings':
    """The records of the given users, same catalog."""
    return self.select(np.isin(self.users, user_indices), name=name)

  def sorted_by_user(self) -> 'Ratings':
    """Records ordered by (user, timestamp, item); a stable canonical order."""
    order = np.lexsort((self.items, self.timestamps, self.users))
    return self.select(order)

  def user_offsets(self) -> np.ndarray:
    """For records sorted by user: offsets[u]..offsets[u+1] are user u's rows."""
    if self.num_ratings and np.any(np.diff(self.users) < 0):
      raise ValueError('user_offsets() needs records sorted by user')
    counts = np.bincount(self.users, minlength=self.num_users)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def global_mean(self) -> float:
    return float(self.ratings.mean()) if self.num_ratings else 0.0

  def save_id_maps(self, directory: str) -> None:
    """Writes user_ids.txt and item_ids.txt (raw id per dense index)."""
    os.makedirs(directory, exist_ok=True)
    self.user_index.save(os.path.join(directory, 'user_ids.txt'))
    self.item_index.save(os.path.join(directory, 'item_ids.txt'))
    meta = {'rating_scale': list(self.rating_scale), 'name': self.name,
            'num_users': self.num_users, 'num_items': self.num_items}
    atomic.write_json(os.path.join(directory, 'dataset.json'), meta)


def load_id_maps(directory: str) -> tuple[IdIndex, IdIndex]:
  """Reads the (user, item) id maps written by `Ratings.save_id_maps`."""
  return (
      IdIndex.load(os.path.join(directory, 'user_ids.txt')),
      IdIndex.load(os.path.join(directory, 'item_ids.txt')),
  )
