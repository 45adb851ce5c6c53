"""Tests for tff_rec.data.readers on small fixtures, good and bad."""

import sys
import zipfile

import numpy as np
import pytest

from tests import shared_data
from tff_rec.data import checksum
from tff_rec.data import errors
from tff_rec.data import readers
from tests.data.fixtures import TESTDATA, U_DATA, assert_error_at, fixture
from tests.data.fixtures import independent_checksum, raw_records


class TestGoodFiles:

  def test_ml100k(self):
    res = readers.read_ml100k(fixture('u.data'))
    r = res.ratings
    assert (r.num_ratings, r.num_users, r.num_items) == (8, 4, 4)
    assert r.user_index.raw_ids.tolist() == ['1', '2', '3', '5']
    assert r.item_index.raw_ids.tolist() == ['10', '20', '30', '40']
    assert raw_records(r) == U_DATA
    assert r.users.dtype == np.int32 and r.ratings.dtype == np.float32
    assert r.rating_scale == (1.0, 5.0)
    assert r.name == 'ml-100k'
    with open(fixture('u.data')) as f:
      expected = independent_checksum(f.read().splitlines())
    assert res.checksum == expected
    assert res.source == fixture('u.data')

  def test_ml1m_same_records_and_checksum_as_u_data(self):
    res = readers.read_ml1m(fixture('ratings.dat'))
    assert raw_records(res.ratings) == U_DATA
    assert res.checksum == readers.read_ml100k(fixture('u.data')).checksum

  def test_ratings_csv_half_stars_and_numeric_id_order(self):
    res = readers.read_ratings_csv(fixture('ratings.csv'))
    r = res.ratings
    assert r.user_index.raw_ids.tolist() == ['1', '2', '10']
    assert sorted(r.ratings.tolist()) == [0.5, 2.5, 3.0, 4.5, 5.0]
    assert r.rating_scale == (0.5, 5.0)
    with open(fixture('ratings.csv')) as f:
      lines = [l.replace(',', '\t') for l in f.read().splitlines()[1:]]
    assert res.checksum == independent_checksum(lines)
    assert '4.5' in ''.join(lines)  # the rating text as in the file: '3.0', not '3'

  def test_recbole_inter_columns_found_by_name(self):
    res = readers.read_recbole_inter(fixture('small.inter'))
    assert raw_records(res.ratings) == U_DATA
    assert res.checksum == readers.read_ml100k(fixture('u.data')).checksum

  def test_generic_csv_with_named_columns_and_string_ids(self):
    res = readers.read_csv(fixture('generic.csv'), user_col='uid', item_col='iid',
                           rating_col='score', timestamp_col='when', delimiter=';')
    assert raw_records(res.ratings) == {('alice', 'm1', 4.0, 100), ('bob', 'm1', 2.0, 101),
                                        ('alice', 'm2', 5.0, 102), ('carol', 'm3', 1.0, 103)}
    assert res.ratings.user_index.raw_ids.tolist() == ['alice', 'bob', 'carol']

  def test_generic_csv_without_header_by_position(self):
    res = readers.read_csv(fixture('u.data'), user_col=0, item_col=1, rating_col=2,
                           timestamp_col=3, delimiter='\t', has_header=False)
    assert raw_records(res.ratings) == U_DATA

  def test_generic_csv_without_timestamp_column(self):
    res = readers.read_csv(fixture('generic.csv'), user_col='uid', item_col='iid',
                           rating_col='score', timestamp_col=None, delimiter=';')
    assert res.ratings.timestamps.tolist() == [0, 0, 0, 0]

  def test_slow_path_agrees_with_fast_path(self, monkeypatch):
    fast = readers.read_ml100k(fixture('u.data'))
    monkeypatch.setattr(readers, '_fast_chunk', lambda *a, **k: None)
    slow = readers.read_ml100k(fixture('u.data'))
    assert fast.checksum == slow.checksum
    for field in ('users', 'items', 'ratings', 'timestamps'):
      np.testing.assert_array_equal(getattr(fast.ratings, field), getattr(slow.ratings, field))

  def test_crlf_and_no_final_newline(self, tmp_path):
    path = tmp_path / 'crlf.data'
    with open(fixture('u.data')) as f:
      text = f.read()
    path.write_bytes(text.rstrip('\n').replace('\n', '\r\n').encode())
    assert raw_records(readers.read_ml100k(str(path)).ratings) == U_DATA

  def test_many_chunks_keep_line_numbers(self, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, '_CHUNK_BYTES', 64)
    lines = [f'{u}\t{i}\t{1 + (u + i) % 5}\t{1000 + i}' for u in range(1, 30) for i in range(1, 8)]
    lines[150] = '99\t3\t9\t1000'
    path = tmp_path / 'u.data'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(errors.DataError) as e:
      readers.read_ml100k(str(path))
    assert_error_at(e, str(path), 151)
    assert 'outside the rating scale' in str(e.value)
    lines[150] = '99\t3\t4\t1000'
    path.write_text('\n'.join(lines) + '\n')
    res = readers.read_ml100k(str(path))
    assert res.ratings.num_ratings == len(lines)
    assert res.checksum == independent_checksum(lines)


class TestZip:

  def make_zip(self, tmp_path):
    z = tmp_path / 'ml-100k.zip'
    with zipfile.ZipFile(z, 'w', zipfile.ZIP_DEFLATED) as f:
      f.write(fixture('u.data'), 'ml-100k/u.data')
      f.write(fixture('bad_rating.data'), 'ml-100k/bad.data')
    return str(z)

  def test_member_argument_and_path_inside_zip(self, tmp_path):
    z = self.make_zip(tmp_path)
    a = readers.read_ml100k(z, 'ml-100k/u.data')
    b = readers.read_ml100k(f'{z}/ml-100k/u.data')
    assert raw_records(a.ratings) == raw_records(b.ratings) == U_DATA
    assert a.source == b.source == f'{z}/ml-100k/u.data'

  def test_error_in_zip_member_names_member_and_line(self, tmp_path):
    z = self.make_zip(tmp_path)
    with pytest.raises(errors.DataError) as e:
      readers.read_ml100k(z, 'ml-100k/bad.data')
    assert_error_at(e, f'{z}/ml-100k/bad.data', 2)

  def test_missing_member(self, tmp_path):
    z = self.make_zip(tmp_path)
    with pytest.raises(errors.DataError, match='not in zip') as e:
      readers.read_ml100k(z, 'ml-100k/u1.base')
    assert e.value.path == z

  def test_corrupt_member_is_integrity_error(self, tmp_path):
    z = tmp_path / 'c.zip'
    data = ('\n'.join(f'{u}\t{i}\t3\t{i}' for u in range(1, 200) for i in range(1, 20)) + '\n')
    with zipfile.ZipFile(z, 'w', zipfile.ZIP_STORED) as f:
      f.writestr('u.data', data)
    raw = bytearray(z.read_bytes())
    at = raw.index(b'199\t10\t3')
    raw[at:at + 3] = b'198'  # same length, wrong CRC
    z.write_bytes(bytes(raw))
    with pytest.raises(errors.IntegrityError) as e:
      readers.read_ml100k(str(z), 'u.data')
    assert e.value.path == f'{z}/u.data'

  def test_not_a_zip(self, tmp_path):
    z = tmp_path / 'x.zip'
    z.write_bytes(b'this is not a zip file')
    with pytest.raises(errors.IntegrityError, match='not a valid zip'):
      readers.read_ml100k(str(z), 'u.data')

  def test_locate(self, tmp_path):
    z = self.make_zip(tmp_path)
    assert readers.locate(z, 'u.data') == f'{z}/ml-100k/u.data'
    assert readers.locate(TESTDATA, 'u.data') == fixture('u.data')
    with pytest.raises(errors.DataError, match="'u9.base' not found"):
      readers.locate(z, 'u9.base')
    with pytest.raises(errors.DataError, match='not found'):
      readers.locate(z, 'u.data', search_subfolders=False)
    with pytest.raises(errors.DataError, match='data source not found'):
      readers.locate(str(tmp_path / 'nope'), 'u.data')


class TestBadInput:

  def test_missing_file(self, tmp_path):
    path = str(tmp_path / 'missing' / 'u.data')
    for read in (readers.read_ml100k, readers.read_ml1m, readers.read_ratings_csv,
                 readers.read_recbole_inter):
      with pytest.raises(errors.DataError, match='file not found') as e:
        read(path)
      assert_error_at(e, path, None)

  @pytest.mark.parametrize('read, name, line, message', [
      (readers.read_ml100k, 'bad_fields.data', 3, 'malformed line: expected 4 fields'),
      (readers.read_ml100k, 'bad_rating.data', 2, "non-numeric rating 'five'"),
      (readers.read_ml100k, 'bad_scale.data', 4, 'rating 6 outside the rating scale 1..5'),
      (readers.read_ml100k, 'bad_header.data', 1, 'unexpected header line'),
      (readers.read_ml100k, 'bad_duplicate.data', 2, 'duplicate rating of item 10 by user 1'),
      (readers.read_ml1m, 'bad_timestamp.dat', 2, "non-integer timestamp '88125.5'"),
      (readers.read_ratings_csv, 'bad_repeated_header.csv', 4, 'repeated header line'),
      (readers.read_ratings_csv, 'bad_scale.csv', 3, 'rating 5.5 outside the rating scale'),
      (readers.read_ml1m, 'u.data', 1, "malformed line: expected 4 fields separated by '::'"),
      (readers.read_ratings_csv, 'u.data', 1, 'expected header'),
  ])
  def test_bad_fixture_names_file_and_line(self, read, name, line, message):
    with pytest.raises(errors.DataError) as e:
      read(fixture(name))
    assert_error_at(e, fixture(name), line)
    assert message in str(e.value)

  @pytest.mark.parametrize('bad_line, message', [
      ('3\t20\t2', 'expected 4 fields'),
      ('3\t20\t2\t881250970\textra', 'expected 4 fields'),
      ('', 'empty line'),
      ('3\t20\tnan\t881250970', 'non-numeric rating'),
      ('3\t20\t4e0\t881250970', 'non-numeric rating'),
      ('3\t20\t+4\t881250970', 'non-numeric rating'),
      ('3\t20\t 4\t881250970', 'non-numeric rating'),
      ('3\t20\t4\t+881250970', 'non-integer timestamp'),
      ('3\t20\t4\t 881250970', 'non-integer timestamp'),
      ('+3\t20\t4\t881250970', "user id '+3' is not a non-negative integer"),
      ('3\t20\t-1\t881250970', 'non-numeric rating'),
      ('3\t20\t0\t881250970', 'outside the rating scale'),
      ('3\t20\t4.5\t881250970', 'outside the rating scale 1..5 in steps of 1'),
      ('3\t20\t4\t881250970.5', 'non-integer timestamp'),
      ('3\t20\t4\t', 'non-integer timestamp'),
      ('x3\t20\t4\t881250970', "user id 'x3' is not a non-negative integer"),
      ('3\t\t4\t881250970', "item id '' is not a non-negative integer"),
      ('3\t20\t4\t99999999999999999999', 'out of range'),
  ])
  def test_each_bad_line_in_the_middle(self, tmp_path, bad_line, message):
    with open(fixture('u.data')) as f:
      lines = f.read().splitlines()
    lines[4] = bad_line
    path = tmp_path / 'u.data'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(errors.DataError) as e:
      readers.read_ml100k(str(path))
    assert_error_at(e, str(path), 5)
    assert message in str(e.value)

  def test_first_bad_line_is_reported(self, tmp_path):
    path = tmp_path / 'u.data'
    path.write_text('1\t1\t5\t1\n1\t2\tx\t2\n1\t3\t9\t3\n')
    with pytest.raises(errors.DataError) as e:
      readers.read_ml100k(str(path))
    assert e.value.line == 2

  def test_empty_file(self, tmp_path):
    path = tmp_path / 'u.data'
    path.write_text('')
    with pytest.raises(errors.DataError, match='no rating records'):
      readers.read_ml100k(str(path))
    csv = tmp_path / 'ratings.csv'
    csv.write_text('userId,movieId,rating,timestamp\n')
    with pytest.raises(errors.DataError, match='no rating records'):
      readers.read_ratings_csv(str(csv))

  def test_inter_missing_column(self, tmp_path):
    path = tmp_path / 'x.inter'
    path.write_text('user_id:token\titem_id:token\tscore:float\n1\t2\t3\n')
    with pytest.raises(errors.DataError, match="no rating column 'rating'") as e:
      readers.read_recbole_inter(str(path))
    assert_error_at(e, str(path), 1)

  def test_inter_repeated_header(self, tmp_path):
    with open(fixture('small.inter')) as f:
      lines = f.read().splitlines()
    lines.insert(5, lines[0])
    path = tmp_path / 'x.inter'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(errors.DataError, match='repeated header line') as e:
      readers.read_recbole_inter(str(path))
    assert_error_at(e, str(path), 6)

  def test_inter_accepts_integral_float_timestamps_only(self, tmp_path):
    path = tmp_path / 'x.inter'
    path.write_text('user_id:token\titem_id:token\trating:float\ttimestamp:float\n'
                    '1\t2\t3\t100.0\n1\t3\t4\t100.5\n')
    with pytest.raises(errors.DataError, match='non-integer timestamp') as e:
      readers.read_recbole_inter(str(path))
    assert_error_at(e, str(path), 3)

  def test_generic_csv_errors(self, tmp_path):
    path = tmp_path / 'g.csv'
    path.write_text('u,i,r\na,b,3\nc,d\n')
    with pytest.raises(errors.DataError, match='expected 3 fields') as e:
      readers.read_csv(str(path), user_col='u', item_col='i', rating_col='r',
                       timestamp_col=None)
    assert_error_at(e, str(path), 3)
    with pytest.raises(errors.DataError, match="no item column 'item'"):
      readers.read_csv(str(path), user_col='u', rating_col='r', timestamp_col=None)
    with pytest.raises(ValueError, match='non-negative ints'):
      readers.read_csv(str(path), has_header=False)

  def test_duplicate_pairs_can_be_allowed(self):
    res = readers.read_csv(fixture('bad_duplicate.data'), user_col=0, item_col=1, rating_col=2,
                           timestamp_col=3, delimiter='\t', has_header=False,
                           allow_duplicates=True)
    assert res.ratings.num_ratings == 2


class TestFilterAndCatalog:

  def ratings(self):
    return readers.read_ml100k(fixture('u.data')).ratings

  def test_min_rating_leaving_a_user_empty_names_the_user(self):
    with pytest.raises(errors.DataError, match=r'user 5 .*drop_empty_users'):
      readers.filter_ratings(self.ratings(), min_rating=4)

  def test_drop_empty_users_explicitly(self):
    out = readers.filter_ratings(self.ratings(), min_rating=4, drop_empty_users=True)
    assert out.ratings.min() >= 4
    assert set(out.user_index.raw_ids[out.present_users()]) == {'1', '2', '3'}
    assert out.num_users == 4  # catalog kept
    compact = readers.filter_ratings(self.ratings(), min_rating=4, drop_empty_users=True,
                                     compact=True)
    assert compact.num_users == 3 and compact.num_items == 3
    assert raw_records(compact) == raw_records(out)

  def test_min_user_and_item_ratings(self):
    out = readers.filter_ratings(self.ratings(), min_user_ratings=2)
    assert set(out.user_index.raw_ids[out.present_users()]) == {'1', '2', '3'}
    out = readers.filter_ratings(self.ratings(), min_item_ratings=2)
    assert out.num_ratings == 7 and '40' not in out.item_index.raw_ids[out.items]
    with pytest.raises(errors.DataError, match='user 3 '):
      readers.filter_ratings(self.ratings(), min_item_ratings=3)  # only item 10 left
    out = readers.filter_ratings(self.ratings(), min_item_ratings=3, drop_empty_users=True)
    assert set(out.item_index.raw_ids[np.unique(out.items)]) == {'10'}
    assert out.num_ratings == 3

  def test_catalog_user_without_ratings_names_file_and_line(self):
    for catalog in (fixture('u.user'), fixture('users.dat')):
      out = readers.filter_ratings(self.ratings(), user_catalog=catalog)
      assert out.num_ratings == self.ratings().num_ratings  # every catalog user rated something
    with pytest.raises(errors.DataError, match='user 4 has no ratings') as e:
      readers.filter_ratings(self.ratings(), user_catalog=fixture('u_extra.user'))
    assert_error_at(e, fixture('u_extra.user'), 4)

  def test_catalog_missing_a_rated_user(self, tmp_path):
    path = tmp_path / 'u.user'
    path.write_text('1|24|M|x|1\n2|24|M|x|1\n3|24|M|x|1\n')
    with pytest.raises(errors.DataError, match='not in the catalog, e.g. user 5'):
      readers.check_user_catalog(self.ratings(), str(path))

  def test_catalog_dropped_users_are_exempt(self):
    # User 4 is dropped (one rating); the catalog check must not then call it unrated.
    out = readers.filter_ratings(self.ratings(), min_user_ratings=2, user_catalog=fixture('u.user'))
    assert set(out.user_index.raw_ids[out.present_users()]) == {'1', '2', '3'}

  def test_check_ids_in_range(self):
    readers.check_ids_in_range(np.array([0, 1, 2]), 3, path='f', lines=np.array([1, 2, 3]))
    with pytest.raises(errors.DataError, match=r'item id 3 out of range \[0, 3\)') as e:
      readers.check_ids_in_range(np.array([0, 3, 5]), 3, path='f', lines=np.array([4, 5, 6]),
                                 what='item id')
    assert_error_at(e, 'f', 5)

  def test_rating_scale(self):
    assert readers.HALF_STARS.contains(np.array([0.5, 5.0, 0.25, 0.0, 5.5, np.nan])).tolist() == [
        True, True, False, False, False, False]
    assert str(readers.STARS) == '1..5 in steps of 1'


class TestSharedData:
  """The real copies in ../shared/data (skipped when absent, unless in CI)."""

  def test_ml100k(self):
    z = shared_data.shared_file('ml-100k.zip')
    res = readers.read_ml100k(z, 'ml-100k/u.data')
    r = res.ratings
    assert (r.num_ratings, r.num_users, r.num_items) == (100_000, 943, 1682)
    assert res.checksum == checksum.KNOWN_CHECKSUMS['ml-100k']
    assert r.user_index.raw_ids[0] == '1' and r.user_index.raw_ids[-1] == '943'
    assert set(np.unique(r.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    readers.check_user_catalog(r, z, 'ml-100k/u.user')
    assert readers.filter_ratings(r, user_catalog=f'{z}/ml-100k/u.user').num_ratings == 100_000

  def test_ml1m(self):
    z = shared_data.shared_file('ml-1m.zip')
    res = readers.read_ml1m(f'{z}/ml-1m/ratings.dat')
    r = res.ratings
    assert (r.num_ratings, r.num_users, r.num_items) == (1_000_209, 6040, 3706)
    assert res.checksum == checksum.KNOWN_CHECKSUMS['ml-1m']
    readers.check_user_catalog(r, z, 'ml-1m/users.dat')
    assert np.all(np.bincount(r.users) >= 20)  # ML-1M: every user rated >= 20 movies

  def test_ml_latest_small(self):
    z = shared_data.shared_file('ml-latest-small.zip')
    res = readers.read_ratings_csv(z, 'ml-latest-small/ratings.csv')
    r = res.ratings
    assert (r.num_ratings, r.num_users, r.num_items) == (100_836, 610, 9724)
    assert r.rating_scale == (0.5, 5.0)
    assert set(np.unique(r.ratings).tolist()) == set(np.arange(1, 11) / 2)
    assert checksum.ratings_checksum(r, '{:.1f}') == res.checksum


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
