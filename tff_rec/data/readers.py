"""Readers for MovieLens rating files, RecBole `.inter` files and generic CSV.

Every reader returns a `ReadResult`: the `Ratings` (dense 0-based indices from
`IdIndex.from_raw`, raw ids kept as strings) and the record-level content
checksum of what was read (`checksum.content_checksum`).

A reader reads a plain file, or a member of a zip file given either as
`member=` or inside the path (`/data/ml-100k.zip/ml-100k/u.data`). Nothing is
skipped: a missing file, a malformed line, a non-numeric or out-of-scale
rating, a repeated header, a non-integer timestamp, an empty line or a
duplicate (user, item) pair raise `DataError` naming the file and the 1-based
line. Integer ids (the MovieLens formats) are normalized (`007` -> `7`).

Parsing runs a vectorized fast path per chunk of lines; when a chunk fails
any check, it is re-scanned line by line to report the first bad line.
ML-1M takes about 2 s. The checksum keeps every record's text in memory
until the end; pass `checksum=False` to skip it for ML-20M and larger.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import zipfile
import zlib
from typing import IO, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from tff_rec.data import checksum as checksum_lib
from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib

DataError = errors.DataError
IntegrityError = errors.IntegrityError

_CHUNK_BYTES = 16 << 20
_DIGITS = b'0123456789'
_INT_RE = re.compile(rb'[0-9]+')
_NUMBER_RE = re.compile(rb'[0-9]+(?:\.[0-9]*)?|\.[0-9]+')
_INT64_MAX = 2**63 - 1
_BOM = b'\xef\xbb\xbf'


@dataclasses.dataclass(frozen=True)
class RatingScale:
  """Allowed rating values: `low..high`, on multiples of `step` if set."""

  low: float
  high: float
  step: Optional[float] = None

  def __post_init__(self):
    if not self.low <= self.high:
      raise ValueError(f'rating scale low {self.low} > high {self.high}')
    if self.step is not None and self.step <= 0:
      raise ValueError(f'rating scale step must be positive, got {self.step}')

  def contains(self, values: np.ndarray) -> np.ndarray:
    """Boolean mask of the values on this scale."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values >= self.low) & (values <= self.high)
    if self.step is not None:
      steps = (values - self.low) / self.step
      ok &= np.abs(steps - np.round(steps)) < 1e-6
    return ok

  def as_tuple(self) -> tuple[float, float]:
    return (float(self.low), float(self.high))

  def __str__(self) -> str:
    step = '' if self.step is None else f' in steps of {self.step:g}'
    return f'{self.low:g}..{self.high:g}{step}'


STARS = RatingScale(1.0, 5.0, 1.0)  # ML-100K, ML-1M
HALF_STARS = RatingScale(0.5, 5.0, 0.5)  # ML-10M, ML-20M, ML-25M, latest


@dataclasses.dataclass(frozen=True, eq=False)
class ReadResult:
  """What a reader returns.

  Attributes:
    ratings: the records, indexed by the ids present in the file.
    checksum: record-level content checksum (None if not computed).
    source: the file read; `archive.zip/member` for a zip member.
  """

  ratings: ratings_lib.Ratings
  checksum: Optional[str]
  source: str


# ---------------------------------------------------------------- opening


def split_zip_path(path: str) -> tuple[str, Optional[str]]:
  """(zip file, member) for `a.zip/dir/file`; (path, None) otherwise."""
  if os.path.isfile(path) or os.path.isdir(path):
    return path, None
  norm = path.replace(os.sep, '/')
  parts = norm.split('/')
  for n in range(len(parts) - 1, 0, -1):
    head = '/'.join(parts[:n])
    if head and os.path.isfile(head) and zipfile.is_zipfile(head):
      return head, '/'.join(parts[n:])
  return path, None


def display_path(path: str, member: Optional[str]) -> str:
  """How a file (or zip member) is named in messages."""
  return path if member is None else f'{path}/{member}'


class _Opened:
  """A binary stream over a file or zip member, closing what it opened."""

  def __init__(self, path: str, member: Optional[str]):
    if member is None:
      path, member = split_zip_path(path)
    self.display = display_path(path, member)
    self._zip = None
    if not os.path.exists(path):
      raise DataError('file not found', path=path)
    if member is None:
      if os.path.isdir(path):
        raise DataError('is a directory, expected a rating file', path=path)
      self.stream: IO[bytes] = open(path, 'rb')
      return
    try:
      self._zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise IntegrityError(f'not a valid zip file ({e})', path=path) from None
    try:
      self.stream = self._zip.open(member)
    except KeyError:
      names = self._zip.namelist()
      self._zip.close()
      shown = ', '.join(names[:20]) + (' ...' if len(names) > 20 else '')
      raise DataError(f'member {member!r} not in zip (members: {shown})', path=path) from None
    except (zipfile.BadZipFile, NotImplementedError, OSError) as e:
      self._zip.close()
      raise IntegrityError(f'cannot open zip member ({e})', path=self.display) from None

  def read(self, n: int = -1) -> bytes:
    try:
      return self.stream.read(n)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
      raise IntegrityError(f'corrupt zip member ({e})', path=self.display) from None

  def readline(self) -> bytes:
    try:
      return self.stream.readline()
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
      raise IntegrityError(f'corrupt zip member ({e})', path=self.display) from None

  def __enter__(self) -> '_Opened':
    return self

  def __exit__(self, *exc) -> None:
    self.stream.close()
    if self._zip is not None:
      self._zip.close()


def read_bytes(path: str, member: Optional[str] = None) -> bytes:
  """The bytes of a file or zip member (DataError if missing or corrupt)."""
  with _Opened(path, member) as f:
    return f.read()


def locate(source: str, filename: str, subdir: Optional[str] = None,
           search_subfolders: bool = True) -> str:
  """Path of `filename` in a directory or zip, e.g. `x.zip/ml-100k/u.data`.

  Looks for `filename` at the top level, in `subdir`, or (if
  `search_subfolders`) in any single sub-folder; DataError naming `source`
  if absent or ambiguous.
  """
  if not os.path.exists(source):
    raise DataError('data source not found', path=source)
  if os.path.isdir(source):
    for cand in ([os.path.join(source, filename)]
                 + ([os.path.join(source, subdir, filename)] if subdir else [])):
      if os.path.isfile(cand):
        return cand
    found = sorted(
        os.path.join(source, d, filename) for d in os.listdir(source)
        if search_subfolders and os.path.isfile(os.path.join(source, d, filename))
    )
  elif zipfile.is_zipfile(source):
    with zipfile.ZipFile(source) as z:
      names = z.namelist()
    for cand in [filename] + ([f'{subdir}/{filename}'] if subdir else []):
      if cand in names:
        return f'{source}/{cand}'
    found = sorted(f'{source}/{n}' for n in names
                   if search_subfolders and n.rsplit('/', 1)[-1] == filename
                   and n.count('/') == 1)
  else:
    raise IntegrityError('not a directory or a valid zip file', path=source)
  if len(found) == 1:
    return found[0]
  if not found:
    raise DataError(f'{filename!r} not found', path=source)
  raise DataError(f'{filename!r} is ambiguous: {", ".join(found)}', path=source)


# ---------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the fields are in a delimited line and how they are checked."""

  delimiter: bytes
  num_fields: int
  user: int
  item: int
  rating: int
  timestamp: Optional[int]
  int_ids: bool
  scale: RatingScale
  header: Optional[bytes] = None  # the header line, if the format has one
  float_timestamps: bool = False  # accept integral floats such as `9.0`


@dataclasses.dataclass
class _Chunk:
  users: np.ndarray  # int64 if int ids, else bytes ('S')
  items: np.ndarray
  ratings: np.ndarray  # float64
  timestamps: np.ndarray  # int64
  records: Optional[list]  # tab-joined record bytes for the checksum
  first_line: int


def _charset_ok(col: Sequence[bytes], allowed: bytes) -> bool:
  """True if every text is non-empty and uses only `allowed` bytes."""
  return b'' not in col and not b''.join(col).translate(None, allowed)


def _fast_chunk(lines: list, first_line: int, lay: _Layout, want_records: bool) -> Optional[_Chunk]:
  """Vectorized parse of well-formed lines; None if any check fails."""
  sep, nf = lay.delimiter, lay.num_fields
  k = nf - 1
  if set(map(operator.methodcaller('count', sep), lines)) != {k}:
    return None
  flat = sep.join(lines).split(sep)
  u, i, r = flat[lay.user::nf], flat[lay.item::nf], flat[lay.rating::nf]
  t = flat[lay.timestamp::nf] if lay.timestamp is not None else None
  try:
    if lay.int_ids:
      if not (_charset_ok(u, _DIGITS) and _charset_ok(i, _DIGITS)):
        return None
      users, items = np.array(u).astype(np.int64), np.array(i).astype(np.int64)
    else:
      if b'' in u or b'' in i:
        return None
      users, items = np.array(u), np.array(i)
    if not _charset_ok(r, _DIGITS + b'.'):
      return None
    rates = np.array(r).astype(np.float64)
    if not lay.scale.contains(rates).all():
      return None
    if t is None:
      stamps = np.zeros(len(lines), np.int64)
    elif lay.float_timestamps:
      if not _charset_ok(t, _DIGITS + b'.'):
        return None
      f = np.array(t).astype(np.float64)
      if not (np.all(f == np.floor(f)) and np.all(f <= _INT64_MAX // 2)):
        return None
      stamps = f.astype(np.int64)
    else:
      if not _charset_ok(t, _DIGITS):
        return None
      stamps = np.array(t).astype(np.int64)
      if stamps.size and stamps.max() > _INT64_MAX // 2:
        return None
  except (ValueError, OverflowError):
    return None
  records = None
  if want_records:
    t_text = t if t is not None else [b'0'] * len(lines)
    records = list(map(b'\t'.join, zip(u, i, r, t_text)))
  return _Chunk(users, items, rates, stamps, records, first_line)


def _show(line: bytes) -> str:
  text = line.decode('utf-8', 'replace')
  return repr(text if len(text) <= 120 else text[:117] + '...')


def _looks_like_header(fields: list, lay: _Layout) -> bool:
  """True if no field that should be numeric is numeric (a header line)."""
  numeric = [lay.rating] + ([lay.timestamp] if lay.timestamp is not None else [])
  if lay.int_ids:
    numeric += [lay.user, lay.item]
  return not any(_NUMBER_RE.fullmatch(fields[c].strip()) for c in numeric)


def _slow_chunk(lines: list, first_line: int, lay: _Layout, path: str,
                want_records: bool) -> _Chunk:
  """Line-by-line parse; raises DataError at the first bad line."""
  sep, nf = lay.delimiter, lay.num_fields
  sep_text = sep.decode()
  users, items, rates, stamps, records = [], [], [], [], []
  for n, line in enumerate(lines):
    lineno = first_line + n

    def fail(msg: str) -> None:
      raise DataError(msg, path=path, line=lineno)

    if lay.header is not None and line == lay.header:
      fail('repeated header line (the header is line 1)')
    if not line.strip():
      fail('empty line')
    fields = line.split(sep)
    if len(fields) != nf:
      fail(f'malformed line: expected {nf} fields separated by {sep_text!r}, '
           f'got {len(fields)}: {_show(line)}')
    if _looks_like_header(fields, lay):
      if lay.header is not None:
        fail(f'repeated header line: {_show(line)}')
      fail(f'unexpected header line (this format has no header): {_show(line)}')
    u, i, r = fields[lay.user], fields[lay.item], fields[lay.rating]
    for what, v in (('user', u), ('item', i)):
      if lay.int_ids:
        if not _INT_RE.fullmatch(v):
          fail(f'{what} id {_show(v)} is not a non-negative integer')
        if int(v) > _INT64_MAX:
          fail(f'{what} id {_show(v)} is too large')
      elif not v:
        fail(f'empty {what} id')
    if not _NUMBER_RE.fullmatch(r):
      fail(f'non-numeric rating {_show(r)}')
    value = float(r)
    if not lay.scale.contains(np.array([value]))[0]:
      fail(f'rating {r.decode()} outside the rating scale {lay.scale}')
    if lay.timestamp is None:
      t, stamp = b'0', 0
    else:
      t = fields[lay.timestamp]
      if lay.float_timestamps and _NUMBER_RE.fullmatch(t) and float(t) == int(float(t)):
        stamp = int(float(t))
      elif _INT_RE.fullmatch(t):
        stamp = int(t)
      else:
        fail(f'non-integer timestamp {_show(t)}')
      if stamp > _INT64_MAX // 2:
        fail(f'timestamp {_show(t)} out of range')
    users.append(int(u) if lay.int_ids else u)
    items.append(int(i) if lay.int_ids else i)
    rates.append(value)
    stamps.append(stamp)
    if want_records:
      records.append(b'\t'.join((u, i, r, t)))
  id_type = np.int64 if lay.int_ids else None
  return _Chunk(
      np.array(users, dtype=id_type) if users else np.zeros(0, id_type or 'S1'),
      np.array(items, dtype=id_type) if items else np.zeros(0, id_type or 'S1'),
      np.array(rates, np.float64), np.array(stamps, np.int64),
      records if want_records else None, first_line,
  )


def _iter_line_chunks(f: _Opened, first_line: int) -> Iterator[tuple[int, list]]:
  """(line number of the first line, lines) per chunk of the stream."""
  buf = b''
  lineno = first_line
  first = True
  while True:
    block = f.read(_CHUNK_BYTES)
    if not block:
      break
    if first and first_line == 1 and block.startswith(_BOM):
      block = block[len(_BOM):]
    first = False
    buf += block
    cut = buf.rfind(b'\n')
    if cut < 0:
      continue
    part, buf = buf[:cut], buf[cut + 1:]
    if b'\r' in part:  # CRLF line ends
      part = part.replace(b'\r\n', b'\n')
      if part.endswith(b'\r'):
        part = part[:-1]
    lines = part.split(b'\n')
    yield lineno, lines
    lineno += len(lines)
  if buf:
    yield lineno, [buf[:-1] if buf.endswith(b'\r') else buf]


def _read_header(f: _Opened) -> bytes:
  line = f.readline()
  if line.startswith(_BOM):
    line = line[len(_BOM):]
  return line.rstrip(b'\n').rstrip(b'\r')


@dataclasses.dataclass
class ParsedRecords:
  """All records of a file before indexing, with the line of each record.

  Ids are int64 for integer-id formats, else bytes; `source` names the file.
  """

  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  lines: np.ndarray  # int64, 1-based line of each record
  checksum: Optional[str]
  source: str


def _parse_stream(f: _Opened, lay: _Layout, first_line: int, want_checksum: bool) -> ParsedRecords:
  chunks = []
  for lineno, lines in _iter_line_chunks(f, first_line):
    chunk = _fast_chunk(lines, lineno, lay, want_checksum)
    if chunk is None:
      chunk = _slow_chunk(lines, lineno, lay, f.display, want_checksum)
    chunks.append((chunk, len(lines)))
  if not chunks:
    raise DataError('no rating records', path=f.display)
  cs = None
  if want_checksum:
    records = [rec for c, _ in chunks for rec in c.records]
    records.sort()
    cs = checksum_lib.sorted_lines_checksum(records)
  line_numbers = np.concatenate(
      [np.arange(c.first_line, c.first_line + n, dtype=np.int64) for c, n in chunks])
  return ParsedRecords(
      users=np.concatenate([c.users for c, _ in chunks]),
      items=np.concatenate([c.items for c, _ in chunks]),
      ratings=np.concatenate([c.ratings for c, _ in chunks]),
      timestamps=np.concatenate([c.timestamps for c, _ in chunks]),
      lines=line_numbers, checksum=cs, source=f.display,
  )


def _index_ids(ids: np.ndarray, parsed: ParsedRecords,
               what: str) -> tuple[ratings_lib.IdIndex, np.ndarray]:
  """(IdIndex.from_raw of the distinct ids, dense index of each record)."""
  if ids.dtype.kind in 'iu':
    uniq, inverse = np.unique(ids, return_inverse=True)
    raw = [str(v) for v in uniq.tolist()]
    index = ratings_lib.IdIndex.from_raw(raw)
    perm = index.to_indices(raw)  # identity: from_raw orders ints numerically
    return index, perm[inverse]
  uniq, inverse = np.unique(ids, return_inverse=True)
  raw = []
  for v in uniq.tolist():
    try:
      raw.append(v.decode('utf-8'))
    except UnicodeDecodeError:
      k = int(np.flatnonzero(ids == v)[0])
      raise DataError(f'{what} id is not valid UTF-8: {v!r}', path=parsed.source,
                      line=int(parsed.lines[k])) from None
  index = ratings_lib.IdIndex.from_raw(raw)
  return index, index.to_indices(raw)[inverse]


def _check_duplicates(users: np.ndarray, items: np.ndarray, user_index: ratings_lib.IdIndex,
                      item_index: ratings_lib.IdIndex, parsed: ParsedRecords) -> None:
  """DataError naming both lines of the first repeated (user, item) pair."""
  keys = users.astype(np.int64) * len(item_index) + items
  order = np.argsort(keys, kind='stable')
  same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
  if same.size:
    first, second = min(((int(order[s]), int(order[s + 1])) for s in same),
                        key=lambda p: p[1])
    raise DataError(
        f'duplicate rating of item {item_index.raw_ids[items[second]]} by user '
        f'{user_index.raw_ids[users[second]]} (first at line {int(parsed.lines[first])})',
        path=parsed.source, line=int(parsed.lines[second]),
    )


def _read(path: str, member: Optional[str], lay: Optional[_Layout], *, name: str,
          header_check: Optional[Callable[[bytes, str], _Layout]] = None,
          checksum: bool = True, allow_duplicates: bool = False) -> ReadResult:
  """Opens, parses (after the header, if `header_check` reads one), indexes."""
  first_line = 1
  with _Opened(path, member) as f:
    if header_check is not None:
      header = _read_header(f)
      lay = header_check(header, f.display)
      first_line = 2
    parsed = _parse_stream(f, lay, first_line, checksum)
  return _to_result(parsed, lay.scale, name, allow_duplicates)


def _to_result(parsed: ParsedRecords, scale: RatingScale, name: str,
               allow_duplicates: bool) -> ReadResult:
  """Indexes the ids and builds the `Ratings`."""
  user_index, users = _index_ids(parsed.users, parsed, 'user')
  item_index, items = _index_ids(parsed.items, parsed, 'item')
  if not allow_duplicates:
    _check_duplicates(users, items, user_index, item_index, parsed)
  r = ratings_lib.Ratings(
      users=users, items=items, ratings=parsed.ratings.astype(np.float32),
      timestamps=parsed.timestamps, user_index=user_index, item_index=item_index,
      rating_scale=scale.as_tuple(), name=name,
  )
  return ReadResult(r, parsed.checksum, parsed.source)


def parse_records(path: str, member: Optional[str] = None, *, delimiter: str = '\t',
                  num_fields: int = 4, scale: RatingScale = STARS,
                  checksum: bool = False) -> ParsedRecords:
  """Raw int records (user, item, rating, timestamp per line) with line numbers.

  For files whose ids are used as they are (e.g. the 0-based NCF files).
  """
  lay = _Layout(delimiter.encode(), num_fields, 0, 1, 2, 3 if num_fields > 3 else None,
                int_ids=True, scale=scale)
  with _Opened(path, member) as f:
    return _parse_stream(f, lay, 1, checksum)


# ---------------------------------------------------------------- readers


def read_ml100k(path: str, member: Optional[str] = None, *, name: str = 'ml-100k',
                scale: RatingScale = STARS, checksum: bool = True) -> ReadResult:
  """ML-100K `u.data` (also `u1.base` etc.): tab-separated, no header."""
  lay = _Layout(b'\t', 4, 0, 1, 2, 3, int_ids=True, scale=scale)
  return _read(path, member, lay, name=name, checksum=checksum)


def read_ratings_dat(path: str, member: Optional[str] = None, *, name: str = 'ml-1m',
                     scale: RatingScale = STARS, checksum: bool = True) -> ReadResult:
  """`UserID::MovieID::Rating::Timestamp` (ML-1M; ML-10M with HALF_STARS)."""
  lay = _Layout(b'::', 4, 0, 1, 2, 3, int_ids=True, scale=scale)
  return _read(path, member, lay, name=name, checksum=checksum)


def read_ml1m(path: str, member: Optional[str] = None, *, name: str = 'ml-1m',
              checksum: bool = True) -> ReadResult:
  """ML-1M `ratings.dat` (integer stars 1..5)."""
  return read_ratings_dat(path, member, name=name, scale=STARS, checksum=checksum)


def read_ml10m(path: str, member: Optional[str] = None, *, name: str = 'ml-10m',
               checksum: bool = True) -> ReadResult:
  """ML-10M `ratings.dat` (half stars 0.5..5)."""
  return read_ratings_dat(path, member, name=name, scale=HALF_STARS, checksum=checksum)


_CSV_HEADER = b'userId,movieId,rating,timestamp'


def read_ratings_csv(path: str, member: Optional[str] = None, *,
                     name: str = 'ml-latest-small', scale: RatingScale = HALF_STARS,
                     checksum: bool = True) -> ReadResult:
  """ML-20M / 25M / latest `ratings.csv` (header `userId,movieId,rating,timestamp`)."""
  lay = _Layout(b',', 4, 0, 1, 2, 3, int_ids=True, scale=scale, header=_CSV_HEADER)

  def check(header: bytes, where: str) -> _Layout:
    if header != _CSV_HEADER:
      raise DataError(f'expected header {_CSV_HEADER.decode()!r}, got {_show(header)}',
                      path=where, line=1)
    return lay

  return _read(path, member, lay, name=name, header_check=check, checksum=checksum)


def _named_columns(header: bytes, where: str, delimiter: bytes, wanted: dict,
                   strip_types: bool) -> dict:
  """Positions of the wanted columns (name or int) in a header line."""
  if not header.strip():
    raise DataError('empty file or empty header line', path=where, line=1)
  names = [n.decode('utf-8', 'replace') for n in header.split(delimiter)]
  if strip_types:
    names = [n.split(':', 1)[0] for n in names]
  out = {}
  for role, col in wanted.items():
    if col is None:
      out[role] = None
    elif isinstance(col, int):
      if not 0 <= col < len(names):
        raise DataError(f'{role} column {col} out of range: the header has {len(names)} fields',
                        path=where, line=1)
      out[role] = col
    elif col in names:
      out[role] = names.index(col)
    else:
      raise DataError(f'no {role} column {col!r} in header (columns: {", ".join(names)})',
                      path=where, line=1)
  out['num_fields'] = len(names)
  return out


def read_recbole_inter(path: str, member: Optional[str] = None, *, name: str = 'ml-100k',
                       scale: RatingScale = STARS, user_field: str = 'user_id',
                       item_field: str = 'item_id', rating_field: str = 'rating',
                       timestamp_field: Optional[str] = 'timestamp',
                       checksum: bool = True) -> ReadResult:
  """A RecBole atomic `.inter` file (tab-separated, `name:type` header)."""

  def check(header: bytes, where: str) -> _Layout:
    cols = _named_columns(header, where, b'\t', {
        'user': user_field, 'item': item_field, 'rating': rating_field,
        'timestamp': timestamp_field}, strip_types=True)
    return _Layout(b'\t', cols['num_fields'], cols['user'], cols['item'], cols['rating'],
                   cols['timestamp'], int_ids=False, scale=scale, header=header,
                   float_timestamps=True)

  return _read(path, member, None, name=name, header_check=check, checksum=checksum)


def read_csv(path: str, member: Optional[str] = None, *,
             user_col: Union[str, int] = 'user', item_col: Union[str, int] = 'item',
             rating_col: Union[str, int] = 'rating',
             timestamp_col: Union[str, int, None] = 'timestamp',
             delimiter: str = ',', has_header: bool = True, num_fields: Optional[int] = None,
             scale: RatingScale = STARS, int_ids: bool = False, name: str = 'ratings',
             checksum: bool = True, allow_duplicates: bool = False) -> ReadResult:
  """A delimited file with the given columns (names need `has_header`).

  Without a header, columns are 0-based positions and lines have
  `num_fields` fields (default: one past the last column used). Fields are
  not unquoted. A missing timestamp column gives timestamps 0. Repeated
  (user, item) pairs are a DataError unless `allow_duplicates`.
  """
  if not delimiter:
    raise ValueError('delimiter must be non-empty')
  sep = delimiter.encode()
  wanted = {'user': user_col, 'item': item_col, 'rating': rating_col,
            'timestamp': timestamp_col}
  if has_header:

    def check(header: bytes, where: str) -> _Layout:
      cols = _named_columns(header, where, sep, wanted, strip_types=False)
      return _Layout(sep, cols['num_fields'], cols['user'], cols['item'], cols['rating'],
                     cols['timestamp'], int_ids=int_ids, scale=scale, header=header)

    return _read(path, member, None, name=name, header_check=check, checksum=checksum,
                 allow_duplicates=allow_duplicates)
  used = [c for c in wanted.values() if c is not None]
  if not all(isinstance(c, int) and c >= 0 for c in used):
    raise ValueError(f'without a header, columns must be non-negative ints, got {wanted}')
  nf = num_fields if num_fields is not None else max(used) + 1
  if max(used) >= nf:
    raise ValueError(f'column {max(used)} out of range for num_fields={nf}')
  lay = _Layout(sep, nf, user_col, item_col, rating_col, timestamp_col,
                int_ids=int_ids, scale=scale)
  return _read(path, member, lay, name=name, checksum=checksum,
               allow_duplicates=allow_duplicates)


# ---------------------------------------------------------------- checks


def read_user_catalog(path: str, member: Optional[str] = None,
                      delimiter: Optional[str] = None) -> list[tuple[str, int]]:
  """(raw user id, line) of each line of `u.user` (`|`) or `users.dat` (`::`)."""
  with _Opened(path, member) as f:
    where = f.display
    data = f.read()
  text = data.decode('utf-8', 'replace').lstrip('\ufeff')
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  if delimiter is None:
    first = lines[0] if lines else ''
    delimiter = '::' if '::' in first else '|' if '|' in first else '\t'
  out, seen = [], {}
  for n, line in enumerate(lines, start=1):
    line = line.rstrip('\r')
    uid = line.split(delimiter, 1)[0].strip()
    if not uid:
      raise DataError('empty line or empty user id', path=where, line=n)
    if _INT_RE.fullmatch(uid.encode()):
      uid = str(int(uid))
    if uid in seen:
      raise DataError(f'user {uid} listed twice (first at line {seen[uid]})', path=where, line=n)
    seen[uid] = n
    out.append((uid, n))
  if not out:
    raise DataError('empty user catalog', path=where)
  return out


def check_user_catalog(ratings: ratings_lib.Ratings, path: str, member: Optional[str] = None,
                       exempt: Sequence[str] = ()) -> None:
  """DataError if a catalog user has no ratings (naming file:line) or a rated
  user is missing from the catalog. `exempt` raw ids may lack ratings."""
  catalog = read_user_catalog(path, member)
  where = display_path(*((path, member) if member else split_zip_path(path)))
  rated = set(ratings.user_index.raw_ids[ratings.present_users()].tolist())
  exempt = set(exempt)
  for uid, line in catalog:
    if uid not in rated and uid not in exempt:
      raise DataError(f'user {uid} has no ratings in {ratings.name}', path=where, line=line)
  listed = {uid for uid, _ in catalog}
  missing = sorted(rated - listed, key=lambda s: (len(s), s))
  if missing:
    raise DataError(f'{len(missing)} rated users not in the catalog, e.g. user {missing[0]}',
                    path=where)


def check_ids_in_range(ids: np.ndarray, limit: int, *, path: str, lines: np.ndarray,
                       what: str = 'id') -> None:
  """DataError at the line of the first id outside [0, limit)."""
  ids = np.asarray(ids)
  bad = np.flatnonzero((ids < 0) | (ids >= limit))
  if bad.size:
    k = int(bad[0])
    raise DataError(f'{what} {int(ids[k])} out of range [0, {limit})', path=path,
                    line=int(lines[k]))


def filter_ratings(ratings: ratings_lib.Ratings, *, min_rating: Optional[float] = None,
                   min_user_ratings: int = 0, min_item_ratings: int = 0,
                   drop_empty_users: bool = False, user_catalog: Optional[str] = None,
                   compact: bool = False) -> ratings_lib.Ratings:
  """Keeps ratings >= `min_rating` and items with >= `min_item_ratings`.

  A user present before that is left with no ratings raises DataError naming
  the user, unless `drop_empty_users`. Then users with fewer than
  `min_user_ratings` ratings are removed (explicitly asked for). With
  `user_catalog` (`u.user` / `users.dat`), a catalog user who had no ratings
  to begin with raises DataError naming that file and line. The catalog is
  kept (indices stay comparable) unless `compact` re-indexes to the ids left.
  """
  keep = np.ones(ratings.num_ratings, bool)
  if min_rating is not None:
    keep &= ratings.ratings >= min_rating
  if min_item_ratings > 0:
    counts = np.bincount(ratings.items[keep], minlength=ratings.num_items)
    keep &= counts[ratings.items] >= min_item_ratings
  before = ratings.present_users()
  after = np.unique(ratings.users[keep])
  emptied = np.setdiff1d(before, after)
  if emptied.size and not drop_empty_users:
    raw = ratings.user_index.raw_ids[emptied].tolist()
    shown = ', '.join(raw[:10]) + (' ...' if len(raw) > 10 else '')
    raise DataError(f'{ratings.name}: {len(raw)} user(s) left with no ratings after filtering: '
                    f'user {shown} (pass drop_empty_users=True to drop them)')
  dropped = set(ratings.user_index.raw_ids[emptied].tolist())
  if min_user_ratings > 0:
    counts = np.bincount(ratings.users[keep], minlength=ratings.num_users)
    sparse = (counts > 0) & (counts < min_user_ratings)
    dropped |= set(ratings.user_index.raw_ids[np.flatnonzero(sparse)].tolist())
    keep &= counts[ratings.users] >= min_user_ratings
  if user_catalog is not None:
    check_user_catalog(ratings, user_catalog, exempt=dropped)
  out = ratings.select(keep)
  if compact:
    out = compact_catalog(out)
  if out.num_ratings == 0:
    raise DataError(f'{ratings.name}: no ratings left after filtering')
  return out


def compact_catalog(r: ratings_lib.Ratings) -> ratings_lib.Ratings:
  """The same records, re-indexed over the users and items present only."""
  users, u_inv = np.unique(r.users, return_inverse=True)
  items, i_inv = np.unique(r.items, return_inverse=True)
  return dataclasses.replace(
      r, users=u_inv, items=i_inv,
      user_index=ratings_lib.IdIndex(r.user_index.raw_ids[users]),
      item_index=ratings_lib.IdIndex(r.item_index.raw_ids[items]),
  )

