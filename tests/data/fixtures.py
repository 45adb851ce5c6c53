"""Paths of the small fixture files in tests/data/testdata and test helpers."""

import hashlib
import os

from tff_rec.data import errors

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'testdata')

# The records of testdata/u.data (and ratings.dat, small.inter) as
# (raw user, raw item, rating, timestamp).
U_DATA = {('1', '10', 5.0, 881250949), ('1', '20', 3.0, 881250950), ('2', '10', 4.0, 881250960),
          ('2', '30', 1.0, 881250955), ('3', '20', 2.0, 881250970), ('3', '30', 5.0, 881250971),
          ('3', '40', 4.0, 881250972), ('5', '10', 3.0, 881250980)}


def fixture(name: str) -> str:
  """Absolute path of a fixture file."""
  return os.path.join(TESTDATA, name)


def independent_checksum(lines: list[str]) -> str:
  """The README's content checksum, written out independently of checksum.py."""
  return hashlib.sha256(('\n'.join(sorted(lines)) + '\n').encode()).hexdigest()


def raw_records(r) -> set:
  """Set of (raw user, raw item, rating, timestamp) of a Ratings."""
  return set(zip(r.user_index.raw_ids[r.users].tolist(), r.item_index.raw_ids[r.items].tolist(),
                 r.ratings.tolist(), r.timestamps.tolist()))


def assert_error_at(exc_info, path: str, line) -> None:
  """The DataError names the file and (if not None) the 1-based line."""
  err = exc_info.value
  assert isinstance(err, errors.DataError), type(err)
  assert err.path == path, (err.path, path)
  assert err.line == line, (err.line, line)
  prefix = f'{path}:{line}: ' if line is not None else f'{path}: '
  assert str(err).startswith(prefix), str(err)
