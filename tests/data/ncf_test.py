"""Tests for tff_rec.data.ncf on a tiny fixture split and the real NCF zip."""

import sys
import os
import shutil

import numpy as np
import pytest

from tests import shared_data
from tests.data.fixtures import TESTDATA, assert_error_at
from tff_rec.data import errors
from tff_rec.data import ncf

FILES = ('tiny.train.rating', 'tiny.test.rating', 'tiny.test.negative')


def tiny_copy(tmp_path, edit=None):
  """A copy of the tiny split; `edit(name, lines)` may change a file's lines."""
  for name in FILES:
    lines = open(os.path.join(TESTDATA, name)).read().splitlines()
    if edit is not None:
      edit(name, lines)
    (tmp_path / name).write_text(''.join(l + '\n' for l in lines))
  return str(tmp_path)


def test_tiny_split():
  s = ncf.read_ncf(TESTDATA, 'tiny', num_negatives=2)
  assert s.kind == 'ncf_leave_one_out' and not s.heldout_users
  assert (s.train.num_users, s.train.num_items) == (3, 6)
  assert s.train.user_index.raw_ids.tolist() == ['0', '1', '2']
  assert len(s.train) == 7 and len(s.val) == 0
  assert s.test.users.tolist() == [0, 1, 2] and s.test.items.tolist() == [3, 4, 1]
  assert s.negatives.tolist() == [[2, 5], [0, 5], [3, 4]]
  assert s.info['test_item_in_negatives'] == 0


def test_tiny_split_in_a_zip(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  archive = shutil.make_archive(str(tmp_path / 'tiny'), 'zip', tiny_copy(src))
  s = ncf.read_ncf(archive, 'tiny', num_negatives=2)
  assert s.negatives.tolist() == [[2, 5], [0, 5], [3, 4]]


def test_declared_counts_are_enforced(tmp_path):
  with pytest.raises(errors.DataError, match=r'item id 5 out of range \[0, 5\)') as e:
    ncf.read_ncf(TESTDATA, 'tiny', num_negatives=2, num_items=5)
  assert_error_at(e, os.path.join(TESTDATA, 'tiny.train.rating'), 7)


@pytest.mark.parametrize('name, row, text, line, message', [
    ('tiny.test.negative', 1, '(1,4)\t0\t9', 2, 'negative item id 9 out of range [0, 6)'),
    ('tiny.test.negative', 2, '(7,1)\t3\t4', 3, 'user id 7 out of range [0, 3)'),
    ('tiny.test.negative', 0, '(0,3)\t2', 1, 'expected 2 negatives, got 1'),
    ('tiny.test.negative', 0, '(0,3)\t2\t5\t4', 1, 'expected 2 negatives, got 3'),
    ('tiny.test.negative', 0, '0,3\t2\t5', 1, 'expected "(user,item)" first'),
    ('tiny.test.negative', 0, '(0,3)\t2\tx', 1, "negative item 'x' is not"),
    ('tiny.test.negative', 1, '(1,2)\t0\t5', 2, 'differs from the test rating of user 1'),
    ('tiny.test.negative', 1, '(1,4)\t1\t5', 2, 'negative item 1 of user 1 is rated in training'),
    ('tiny.test.negative', 2, '(1,4)\t0\t5', 3, 'user 1 appears twice'),
    ('tiny.test.rating', 2, '1\t3\t3\t202', 3, 'user 1 appears twice'),
    ('tiny.test.rating', 1, '1\t1\t5\t201', 2, 'is also in the training file'),
    ('tiny.test.rating', 0, '0\t3\t7\t200', 1, 'outside the rating scale'),
    ('tiny.train.rating', 3, '1\t2\t2', 4, 'malformed line'),
    ('tiny.train.rating', 3, '1\t1\t2\t103', 4, 'duplicate rating of item 1 by user 1'),
    ('tiny.train.rating', 0, '-1\t0\t5\t100', 1, 'is not a non-negative integer'),
])
def test_bad_files_name_file_and_line(tmp_path, name, row, text, line, message):

  def edit(file, lines):
    if file == name:
      lines[row] = text

  folder = tiny_copy(tmp_path, edit)
  with pytest.raises(errors.DataError) as e:
    ncf.read_ncf(folder, 'tiny', num_negatives=2)
  assert_error_at(e, os.path.join(folder, name), line)
  assert message in str(e.value)


def test_missing_test_user(tmp_path):

  def edit(file, lines):
    if file in ('tiny.test.rating', 'tiny.test.negative'):
      del lines[1]

  folder = tiny_copy(tmp_path, edit)
  with pytest.raises(errors.DataError, match='no line, e.g. user 1') as e:
    ncf.read_ncf(folder, 'tiny', num_negatives=2)
  assert e.value.path == os.path.join(folder, 'tiny.test.rating')


def test_missing_file(tmp_path):
  folder = tiny_copy(tmp_path)
  os.remove(os.path.join(folder, 'tiny.test.negative'))
  with pytest.raises(errors.DataError, match="'tiny.test.negative' not found") as e:
    ncf.read_ncf(folder, 'tiny', num_negatives=2)
  assert e.value.path == folder


def test_real_ncf_zip():
  s = ncf.read_ncf(shared_data.shared_file('ncf-ml-1m.zip'))
  assert (len(s.train), len(s.test)) == (994_169, 6_040)
  assert (s.train.num_users, s.train.num_items) == (6040, 3706)
  assert s.negatives.shape == (6040, 99)
  assert np.array_equal(s.test.users, np.arange(6040))
  assert len(np.unique(s.train.users)) == 6040
  rows = [set(r) for r in s.negatives.tolist()]
  assert all(len(r) == 99 for r in rows)
  # The published negatives hold some users' own test items; kept and counted.
  hit = sum(int(i) in r for i, r in zip(s.test.items.tolist(), rows))
  assert hit == s.info['test_item_in_negatives'] > 0


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
