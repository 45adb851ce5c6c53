"""Tests for tff_rec.data.checksum."""

import sys
import hashlib

import pytest

from tff_rec.data import checksum
from tff_rec.data import readers
from tests.data.fixtures import fixture


def test_definition_sorted_joined_sha256():
  records = [('2', '10', '4', '7'), ('1', '10', '5', '9')]
  expected = hashlib.sha256(b'1\t10\t5\t9\n2\t10\t4\t7\n').hexdigest()
  assert checksum.content_checksum(records) == expected
  assert checksum.content_checksum(reversed(records)) == expected
  assert checksum.content_checksum(['2\t10\t4\t7', b'1\t10\t5\t9']) == expected


def test_rating_text_matters():
  a = checksum.content_checksum([('1', '10', '4', '9')])
  b = checksum.content_checksum([('1', '10', '4.0', '9')])
  assert a != b


def test_empty_and_bad_records():
  assert checksum.content_checksum([]) == hashlib.sha256(b'').hexdigest()  # no lines
  with pytest.raises(ValueError, match='4 fields'):
    checksum.content_checksum([('1', '2', '3')])


def test_sorted_lines_checksum_in_blocks(monkeypatch):
  lines = sorted(f'{u}\t{i}\t3\t0'.encode() for u in range(50) for i in range(7))
  expected = hashlib.sha256(b'\n'.join(lines) + b'\n').hexdigest()
  monkeypatch.setattr(checksum, '_CHUNK', 16)
  assert checksum.sorted_lines_checksum(lines) == expected


def test_ratings_checksum_matches_file_checksum():
  res = readers.read_ml100k(fixture('u.data'))
  assert checksum.ratings_checksum(res.ratings) == res.checksum
  csv = readers.read_ratings_csv(fixture('ratings.csv'))
  assert checksum.ratings_checksum(csv.ratings, '{:.1f}') == csv.checksum


def test_known_checksums():
  assert checksum.known_checksum('ml-100k').startswith('3c61dc9b')
  assert checksum.known_checksum('ml-1m').startswith('ebd21ce6')
  assert checksum.known_checksum('ml-25m') is None
  assert all(len(v) == 64 for v in checksum.KNOWN_CHECKSUMS.values())


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
