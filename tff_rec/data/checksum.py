"""Record-level content checksums of rating files, independent of line order.

The checksum of a rating record set (see `../shared/data/README.md`): write
every record as `user<TAB>item<TAB>rating<TAB>timestamp` with the texts as
they appear in the file, sort the records, join them with `\\n` (ending in
`\\n`) and take the SHA-256 of the UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence, Union

# Content checksums of the published data sets (README of ../shared/data).
KNOWN_CHECKSUMS: dict[str, str] = {
    'ml-100k': '3c61dc9b90a365d2ac50bdee9df8024ddf0eea4b1a15678d9934a77e75fe0ede',
    'ml-1m': 'ebd21ce60dd5a3f29cfabca4e3c6d0f9ddb8198997e7ac1aee49f25fdaa85913',
}

Record = Union[str, bytes, Sequence[Union[str, bytes]]]

_CHUNK = 1 << 16


def _as_bytes(record: Record) -> bytes:
  """One record as `user\\titem\\trating\\ttimestamp` bytes."""
  if isinstance(record, bytes):
    return record
  if isinstance(record, str):
    return record.encode('utf-8')
  fields = [f if isinstance(f, bytes) else str(f).encode('utf-8') for f in record]
  if len(fields) != 4:
    raise ValueError(f'a record has 4 fields (user, item, rating, timestamp), got {len(fields)}')
  return b'\t'.join(fields)


def content_checksum(records: Iterable[Record]) -> str:
  """SHA-256 (hex) of the sorted records joined by newlines.

  Each record is a 4-tuple of texts (user, item, rating, timestamp) or an
  already tab-joined line (`str` or `bytes`, without the newline). No
  records hash the empty string.
  """
  lines = sorted(_as_bytes(r) for r in records)
  return sorted_lines_checksum(lines)


def sorted_lines_checksum(sorted_lines: Sequence[bytes]) -> str:
  """SHA-256 (hex) of already sorted, tab-joined record lines."""
  digest = hashlib.sha256()
  for start in range(0, len(sorted_lines), _CHUNK):
    digest.update(b'\n'.join(sorted_lines[start:start + _CHUNK]))
    digest.update(b'\n')
  return digest.hexdigest()


def ratings_checksum(ratings, rating_format: str = '{:g}') -> str:
  """Checksum of a `Ratings` from its raw ids and formatted ratings.

  Equals the file checksum only when the file wrote ratings the way
  `rating_format` does (`'{:g}'` gives `4` for ML-100K/1M, `'{:.1f}'` gives
  `4.0` for the CSV releases).
  """
  users = ratings.user_index.raw_ids[ratings.users].tolist()
  items = ratings.item_index.raw_ids[ratings.items].tolist()
  rates = [rating_format.format(float(r)) for r in ratings.ratings.tolist()]
  stamps = [str(t) for t in ratings.timestamps.tolist()]
  return content_checksum(zip(users, items, rates, stamps))


def known_checksum(name: str) -> str | None:
  """The published content checksum of a data set, or None if unknown."""
  return KNOWN_CHECKSUMS.get(name)
