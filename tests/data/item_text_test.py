"""Item texts from the MovieLens catalogs; bad lines name the file and line."""

import sys
import os

import numpy as np
import pytest

from tests import shared_data
from tff_rec.data import errors
from tff_rec.data import item_text
from tff_rec.data import ratings as ratings_lib


def test_movies_dat(tmp_path):
  path = tmp_path / 'movies.dat'
  path.write_bytes('1::Toy Story (1995)::Animation|Comedy\n2::Cité (1995)::Drama\n'.encode('latin-1'))
  assert item_text.parse_movies_dat(str(path)) == {
      '1': 'Toy Story (1995). Genres: Animation, Comedy.', '2': 'Cité (1995). Genres: Drama.'}
  path.write_text('1::Toy Story (1995)::Animation\nbroken line\n')
  with pytest.raises(errors.DataError, match=r'movies.dat.*line 2|line 2.*movies.dat'):
    item_text.parse_movies_dat(str(path))


def test_u_item(tmp_path):
  (tmp_path / 'u.genre').write_text('unknown|0\nAction|1\nComedy|2\n')
  (tmp_path / 'u.item').write_text('1|Heat (1995)|01-Jan-1995||http://x|0|1|1\n2|Odd (1995)|||x|1|0|0\n')
  assert item_text.parse_u_item(str(tmp_path / 'u.item'), str(tmp_path / 'u.genre')) == {
      '1': 'Heat (1995). Genres: Action, Comedy.', '2': 'Odd (1995).'}
  (tmp_path / 'u.item').write_text('1|Heat (1995)|01-Jan-1995||http://x|0|1\n')
  with pytest.raises(errors.DataError, match='line 1: expected'):
    item_text.parse_u_item(str(tmp_path / 'u.item'), str(tmp_path / 'u.genre'))


def test_movies_csv_with_tags_most_used_first(tmp_path):
  (tmp_path / 'movies.csv').write_text(
      'movieId,title,genres\n1,"Heat, The (1995)",Crime|Drama\n2,Odd,(no genres listed)\n')
  (tmp_path / 'tags.csv').write_text(
      'userId,movieId,tag,timestamp\n1,1,slow,5\n2,1,tense,6\n3,1,tense,7\n')
  out = item_text.parse_movies_csv(str(tmp_path / 'movies.csv'), str(tmp_path / 'tags.csv'))
  assert out == {'1': 'Heat, The (1995). Genres: Crime, Drama. Tags: tense, slow.', '2': 'Odd.'}
  (tmp_path / 'tags.csv').write_text('user,movie,tag\n')
  with pytest.raises(errors.DataError, match='line 1: expected the header'):
    item_text.parse_movies_csv(str(tmp_path / 'movies.csv'), str(tmp_path / 'tags.csv'))


def test_every_item_needs_a_text():
  index = ratings_lib.IdIndex(np.array(['1', '7'], dtype=object))
  assert item_text.texts_for_items({'1': 'a', '7': 'b', '9': 'c'}, index) == ['a', 'b']
  with pytest.raises(errors.DataError, match='no catalog text, e.g. item 7'):
    item_text.texts_for_items({'1': 'a'}, index)


@pytest.mark.parametrize('name,count,first', [
    ('ml-1m', 3883, "Toy Story (1995). Genres: Animation, Children's, Comedy."),
    ('ml-100k', 1682, "Toy Story (1995). Genres: Animation, Children's, Comedy."),
    ('ml-latest-small', 9742, 'Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, '
     'Fantasy. Tags: pixar, fun.'),
])
def test_real_catalogs(name, count, first):
  data_dir = os.path.dirname(shared_data.shared_file(f'{name}.zip'))
  texts = item_text.read_item_texts(name, data_dir)
  assert len(texts) == count and texts['1'] == first


def test_unsupported_release(tmp_path):
  with pytest.raises(errors.DataError, match='no item texts for ml-20m'):
    item_text.read_item_texts('ml-20m', str(tmp_path))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
