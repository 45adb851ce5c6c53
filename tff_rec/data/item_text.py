"""Item texts for language-model item encoders, from the MovieLens item catalogs.

A text is built from what each release has: `Title (Year). Genres: A, B.`,
and for ml-latest-small also `Tags: x, y.` (its users' free-text tags, the
most used first, at most `max_tags`). The catalogs:

* ml-1m `movies.dat`: `MovieID::Title (Year)::Genre|Genre` (Latin-1);
* ml-100k `u.item`: `id|title|release date|video date|IMDb URL|19 genre flags`
  (Latin-1), genre names from `u.genre`;
* ml-latest-small `movies.csv` (`movieId,title,genres`, UTF-8, quoted) and
  `tags.csv` (`userId,movieId,tag,timestamp`).

Tags are item-side text written by users, not anyone's sequence; a tag can
come from a user whose held-out item it describes, which tells the model
nothing about which user that was. Bad lines raise DataError naming the file
and line.
"""

from __future__ import annotations

import collections
import csv
import io
import os
from typing import Optional

from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import readers
from tff_rec.data import sources

DataError = errors.DataError
NO_GENRES = '(no genres listed)'


def _lines(path: str, encoding: str) -> list[str]:
  data = readers.read_bytes(path)
  try:
    return data.decode(encoding).splitlines()
  except UnicodeDecodeError as e:
    raise DataError(f'not {encoding} text ({e})', path=path) from None


def _text(title: str, genres: list[str], tags: Optional[list[str]] = None) -> str:
  out = title.strip() + '.'
  genres = [g for g in genres if g and g != NO_GENRES and g != 'unknown']
  if genres:
    out += ' Genres: ' + ', '.join(genres) + '.'
  if tags:
    out += ' Tags: ' + ', '.join(tags) + '.'
  return out


def parse_movies_dat(path: str) -> dict[str, str]:
  """ml-1m `movies.dat`: raw item id -> text."""
  out = {}
  for n, line in enumerate(_lines(path, 'latin-1'), 1):
    if not line.strip():
      continue
    parts = line.split('::')
    if len(parts) != 3 or not parts[0].strip().isdigit():
      raise DataError(f'line {n}: expected MovieID::Title::Genres, got {line[:80]!r}', path=path)
    out[parts[0].strip()] = _text(parts[1], parts[2].split('|'))
  return out


def parse_u_item(path: str, genre_path: str) -> dict[str, str]:
  """ml-100k `u.item` with genre names from `u.genre`: raw item id -> text."""
  genres = {}
  for n, line in enumerate(_lines(genre_path, 'latin-1'), 1):
    if line.strip():
      name, _, index = line.rpartition('|')
      if not index.strip().isdigit():
        raise DataError(f'line {n}: expected name|index, got {line[:80]!r}', path=genre_path)
      genres[int(index)] = name
  names = [genres.get(k) for k in range(len(genres))]
  if None in names:
    raise DataError(f'genre indices are not 0..{len(genres) - 1}', path=genre_path)
  out = {}
  for n, line in enumerate(_lines(path, 'latin-1'), 1):
    if not line.strip():
      continue
    parts = line.split('|')
    flags = parts[5:]
    if len(flags) != len(names) or not parts[0].strip().isdigit() or set(flags) - {'0', '1'}:
      raise DataError(f'line {n}: expected id|title|date|video date|URL|{len(names)} genre flags, '
                      f'got {line[:80]!r}', path=path)
    out[parts[0].strip()] = _text(parts[1], [g for g, f in zip(names, flags) if f == '1'])
  return out


def parse_movies_csv(path: str, tags_path: Optional[str] = None, *,
                     max_tags: int = 10) -> dict[str, str]:
  """ml-latest-small `movies.csv` (+ `tags.csv`): raw item id -> text."""
  tags = collections.defaultdict(collections.Counter)
  if tags_path is not None:
    rows = csv.reader(io.StringIO('\n'.join(_lines(tags_path, 'utf-8'))))
    header = next(rows, None)
    if header != ['userId', 'movieId', 'tag', 'timestamp']:
      raise DataError(f'line 1: expected the header userId,movieId,tag,timestamp, got {header}',
                      path=tags_path)
    for n, row in enumerate(rows, 2):
      if len(row) != 4:
        raise DataError(f'line {n}: expected 4 fields, got {len(row)}', path=tags_path)
      tags[row[1]][row[2].strip()] += 1
  rows = csv.reader(io.StringIO('\n'.join(_lines(path, 'utf-8'))))
  header = next(rows, None)
  if header != ['movieId', 'title', 'genres']:
    raise DataError(f'line 1: expected the header movieId,title,genres, got {header}', path=path)
  out = {}
  for n, row in enumerate(rows, 2):
    if len(row) != 3 or not row[0].isdigit():
      raise DataError(f'line {n}: expected movieId,title,genres, got {row}', path=path)
    top = [t for t, _ in sorted(tags[row[0]].items(), key=lambda kv: (-kv[1], kv[0]))[:max_tags]]
    out[row[0]] = _text(row[1], row[2].split('|'), top)
  return out


def read_item_texts(name: str, data_dir: str, *, tags: bool = True) -> dict[str, str]:
  """Raw item id -> text for a MovieLens release in `data_dir`.

  Args:
    name: 'ml-1m', 'ml-100k' or 'ml-latest-small'.
    data_dir: The folder (or zip) `load_movielens` reads the ratings from.
    tags: ml-latest-small: append its tags.

  Returns:
    One text per catalog item.

  Raises:
    DataError: An unsupported release, a missing catalog file or a bad line.
  """
  spec = sources.dataset_spec(name)
  if not os.path.exists(data_dir):
    raise DataError('data_dir not found', path=data_dir)
  container = data_dir
  zipped = os.path.join(data_dir, f'{name}.zip')
  if os.path.isdir(data_dir) and os.path.isfile(zipped):
    try:
      readers.locate(data_dir, spec.ratings_file, subdir=spec.folder, search_subfolders=False)
    except DataError:
      container = zipped

  def find(filename: str) -> str:
    return readers.locate(container, filename, subdir=spec.folder, search_subfolders=False)

  if name == 'ml-1m':
    return parse_movies_dat(find('movies.dat'))
  if name == 'ml-100k':
    return parse_u_item(find('u.item'), find('u.genre'))
  if name == 'ml-latest-small':
    return parse_movies_csv(find('movies.csv'), find('tags.csv') if tags else None)
  raise DataError(f'no item texts for {name}; supported: ml-1m, ml-100k, ml-latest-small')


def texts_for_items(texts: dict[str, str], item_index: ratings_lib.IdIndex) -> list[str]:
  """The text of every item of `item_index`, in index order; DataError naming a missing item."""
  missing = [r for r in item_index.raw_ids.tolist() if r not in texts]
  if missing:
    raise DataError(f'{len(missing)} rated item(s) have no catalog text, e.g. item '
                    f'{", ".join(missing[:5])}')
  return [texts[r] for r in item_index.raw_ids.tolist()]
