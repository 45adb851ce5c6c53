"""Tests for tff_rec.data.sources; downloads only from 127.0.0.1 or file://."""

import sys
import hashlib
import http.server
import io
import os
import socket
import subprocess
import threading
import zipfile

import pytest

from tests import shared_data
from tests.data.fixtures import U_DATA, fixture, raw_records
from tff_rec.data import checksum
from tff_rec.data import errors
from tff_rec.data import sources

# The real values, saved before the autouse fixture replaces them.
REAL_GROUPLENS_URL = sources.GROUPLENS_URL
REAL_PIP_DOWNLOAD = sources.pip_download


def closed_port_url(name: str = 'x') -> str:
  """A 127.0.0.1 URL nothing listens on (connection refused)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/{name}.zip'


@pytest.fixture(autouse=True)
def no_internet(monkeypatch, tmp_path):
  """No test reaches GroupLens, the user's cache or (unless asked) pip."""
  monkeypatch.setattr(sources, 'GROUPLENS_URL', closed_port_url('{name}'))
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / 'env-cache'))

  def no_pip(*args, **kwargs):
    raise AssertionError('pip must not run in this test')

  monkeypatch.setattr(sources, 'pip_download', no_pip)


def small_zip(folder: str, files: dict) -> bytes:
  """A zip (bytes) holding `folder/<name>` for each fixture file to copy."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    for member, source in files.items():
      z.write(fixture(source), f'{folder}/{member}')
  return buf.getvalue()


LATEST_ZIP = small_zip('ml-latest-small', {'ratings.csv': 'ratings.csv'})
ML100K_FAKE_ZIP = small_zip('ml-100k', {'u.data': 'u.data', 'u.user': 'u.user'})


class Server:
  """An http.server on 127.0.0.1 with canned (and broken) responses."""

  def __init__(self):
    self.routes = {}
    routes = self.routes

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # noqa: N802
        route = routes.get(self.path)
        if route is None:
          self.send_error(404)
          return
        body, length = route
        self.send_response(200)
        self.send_header('Content-Type', 'application/zip')
        self.send_header('Content-Length', str(length))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def add(self, path: str, body: bytes, length=None) -> str:
    self.routes[path] = (body, len(body) if length is None else length)
    return f'http://127.0.0.1:{self.httpd.server_port}{path}'

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def listing(directory) -> list:
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


class TestDownload:

  def test_http_download_into_cache_then_cache_hit(self, server, tmp_path):
    url = server.add('/ml-latest-small.zip', LATEST_ZIP)
    cache = tmp_path / 'cache'
    r, info = sources.load_movielens('ml-latest-small', cache_dir=str(cache), url=url)
    assert info.origin == 'download'
    assert listing(cache) == ['ml-latest-small.zip']
    assert (cache / 'ml-latest-small.zip').read_bytes() == LATEST_ZIP
    assert info.path == f'{cache}/ml-latest-small.zip/ml-latest-small/ratings.csv'
    assert r.num_ratings == 5 and not info.checksum_verified
    server.routes.clear()  # a second load must not download
    r2, info2 = sources.load_movielens('ml-latest-small', cache_dir=str(cache), url=url)
    assert info2.origin == 'cache' and info2.checksum == info.checksum
    assert raw_records(r2) == raw_records(r)

  def test_file_url(self, tmp_path):
    src = tmp_path / 'src.zip'
    src.write_bytes(LATEST_ZIP)
    cache = tmp_path / 'cache'
    _, info = sources.load_movielens('ml-latest-small', cache_dir=str(cache),
                                     url=src.as_uri())
    assert info.origin == 'download'
    assert listing(cache) == ['ml-latest-small.zip']

  def test_truncated_body_is_integrity_error_and_leaves_nothing(self, server, tmp_path):
    url = server.add('/t.zip', LATEST_ZIP[:len(LATEST_ZIP) // 2], length=len(LATEST_ZIP))
    cache = tmp_path / 'cache'
    with pytest.raises(errors.IntegrityError, match='truncated download') as e:
      sources.load_movielens('ml-latest-small', cache_dir=str(cache), url=url)
    assert e.value.path == url and url in str(e.value)
    assert listing(cache) == []

  def test_wrong_content_length(self, server, tmp_path):
    url = server.add('/long.zip', LATEST_ZIP, length=len(LATEST_ZIP) + 1)
    with pytest.raises(errors.IntegrityError, match='Content-Length') as e:
      sources.download(url, str(tmp_path / 'c' / 'x.zip'))
    assert e.value.path == url
    assert listing(tmp_path / 'c') == []

  def test_corrupt_zip(self, server, tmp_path):
    body = bytearray(small_zip('ml-latest-small', {'ratings.csv': 'ratings.csv'}))
    body[60:70] = b'\0' * 10  # inside the compressed data: CRC fails
    url = server.add('/c.zip', bytes(body))
    cache = tmp_path / 'cache'
    with pytest.raises(errors.IntegrityError, match='zip') as e:
      sources.load_movielens('ml-latest-small', cache_dir=str(cache), url=url)
    assert e.value.path == url
    assert listing(cache) == []

  def test_not_a_zip(self, server, tmp_path):
    url = server.add('/html.zip', b'<html>not found</html>')
    with pytest.raises(errors.IntegrityError, match='not a valid zip'):
      sources.load_movielens('ml-latest-small', cache_dir=str(tmp_path), url=url)
    assert listing(tmp_path) == []

  def test_known_checksum_mismatch_is_rejected(self, server, tmp_path):
    url = server.add('/ml-100k.zip', ML100K_FAKE_ZIP)
    with pytest.raises(errors.IntegrityError, match='differs from the published ml-100k'):
      sources.load_movielens('ml-100k', cache_dir=str(tmp_path), url=url,
                             allow_wheel_fallback=False)
    assert listing(tmp_path) == []

  def test_bad_user_catalog_in_download_is_not_cached(self, server, monkeypatch, tmp_path):
    fixture_sum = checksum.content_checksum(open(fixture('u.data')).read().splitlines())
    monkeypatch.setitem(checksum.KNOWN_CHECKSUMS, 'ml-100k', fixture_sum)
    url = server.add('/ml-100k.zip', small_zip('ml-100k', {'u.data': 'u.data',
                                                           'u.user': 'u_extra.user'}))
    with pytest.raises(errors.DataError, match='user 4 has no ratings') as e:
      sources.load_movielens('ml-100k', cache_dir=str(tmp_path), url=url)
    assert e.value.path.endswith('/ml-100k/u.user') and e.value.line == 4
    assert listing(tmp_path) == []
    url = server.add('/ml-100k.zip', ML100K_FAKE_ZIP)
    r, info = sources.load_movielens('ml-100k', cache_dir=str(tmp_path), url=url)
    assert info.checksum_verified and raw_records(r) == U_DATA
    assert info.user_catalog == f'{tmp_path}/ml-100k.zip/ml-100k/u.user'
    assert listing(tmp_path) == ['ml-100k.zip']

  def test_expected_sha256(self, server, tmp_path):
    url = server.add('/ml-latest-small.zip', LATEST_ZIP)
    with pytest.raises(errors.IntegrityError, match='sha256'):
      sources.load_movielens('ml-latest-small', cache_dir=str(tmp_path), url=url,
                             expected_sha256='0' * 64)
    assert listing(tmp_path) == []
    good = hashlib.sha256(LATEST_ZIP).hexdigest()
    _, info = sources.load_movielens('ml-latest-small', cache_dir=str(tmp_path), url=url,
                                     expected_sha256=good)
    assert info.origin == 'download'

  def test_interrupted_write_leaves_nothing(self, server, tmp_path):
    url = server.add('/x.zip', LATEST_ZIP)

    def interrupt(tmp):
      assert os.path.exists(tmp)
      raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      sources.download(url, str(tmp_path / 'x.zip'), verify=interrupt)
    assert listing(tmp_path) == []

  def test_http_404_and_refused_are_download_errors(self, server, tmp_path):
    missing = server.add('/exists.zip', b'x').replace('exists', 'missing')
    for url in (missing, closed_port_url()):
      with pytest.raises(sources.DownloadError, match='cannot download') as e:
        sources.load_movielens('ml-1m', cache_dir=str(tmp_path), url=url)
      assert e.value.path == url
    assert listing(tmp_path) == []

  def test_default_url_is_grouplens(self):
    assert REAL_GROUPLENS_URL.format(name='ml-1m') == (
        'https://files.grouplens.org/datasets/movielens/ml-1m.zip')


class TestLocalSources:

  def test_missing_data_dir_names_it(self, tmp_path):
    path = str(tmp_path / 'nope')
    with pytest.raises(errors.DataError, match='data_dir not found') as e:
      sources.load_movielens('ml-100k', data_dir=path)
    assert e.value.path == path

  def test_data_dir_folder_zip_and_parent_folder(self, tmp_path):
    folder = tmp_path / 'extracted' / 'ml-latest-small'
    folder.mkdir(parents=True)
    (folder / 'ratings.csv').write_bytes(open(fixture('ratings.csv'), 'rb').read())
    zipped = tmp_path / 'ml-latest-small.zip'
    zipped.write_bytes(LATEST_ZIP)
    results = [sources.load_movielens('ml-latest-small', data_dir=str(d))
               for d in (folder, tmp_path / 'extracted', zipped, tmp_path)]
    assert {info.origin for _, info in results} == {'data_dir'}
    assert len({info.checksum for _, info in results}) == 1
    assert results[3][1].path == f'{zipped}/ml-latest-small/ratings.csv'

  def test_wrong_release_in_zip_is_not_picked(self, tmp_path):
    zipped = tmp_path / 'ml-latest-small.zip'
    zipped.write_bytes(LATEST_ZIP)
    with pytest.raises(errors.DataError, match="'ratings.csv' not found"):
      sources.load_movielens('ml-latest', data_dir=str(zipped))

  def test_data_dir_checks_user_catalog(self, monkeypatch, tmp_path):
    fixture_sum = checksum.content_checksum(open(fixture('u.data')).read().splitlines())
    monkeypatch.setitem(checksum.KNOWN_CHECKSUMS, 'ml-100k', fixture_sum)
    folder = tmp_path / 'ml-100k'
    folder.mkdir()
    (folder / 'u.data').write_bytes(open(fixture('u.data'), 'rb').read())
    (folder / 'u.user').write_bytes(open(fixture('u_extra.user'), 'rb').read())
    with pytest.raises(errors.DataError, match='user 4 has no ratings') as e:
      sources.load_movielens('ml-100k', data_dir=str(folder), check_catalog=True)
    assert e.value.line == 4 and e.value.path == str(folder / 'u.user')
    (folder / 'u.user').write_bytes(open(fixture('u.user'), 'rb').read())
    _, info = sources.load_movielens('ml-100k', data_dir=str(folder))
    assert info.checksum_verified and info.user_catalog == str(folder / 'u.user')
    assert info.fold_source is None

  def test_data_dir_with_other_ml100k_records_is_rejected(self, tmp_path):
    folder = tmp_path / 'ml-100k'
    folder.mkdir()
    (folder / 'u.data').write_bytes(open(fixture('u.data'), 'rb').read())
    with pytest.raises(errors.IntegrityError, match='differs from the published ml-100k') as e:
      sources.load_movielens('ml-100k', data_dir=str(folder))
    assert e.value.path == str(folder / 'u.data')

  def test_unknown_name(self):
    with pytest.raises(ValueError, match='ml-100k, ml-1m, ml-10m'):
      sources.load_movielens('ml-5k')

  def test_no_download_allowed(self, tmp_path):
    with pytest.raises(errors.DataError, match='downloads are disabled'):
      sources.load_movielens('ml-1m', cache_dir=str(tmp_path), allow_download=False)

  def test_cache_dir_resolution(self, monkeypatch, tmp_path):
    assert sources.cache_dir_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / 'env'))
    assert sources.cache_dir_path() == str(tmp_path / 'env')
    monkeypatch.delenv(sources.CACHE_ENV)
    assert sources.cache_dir_path() == os.path.expanduser('~/.cache/tff_rec')

  def test_env_cache_dir_is_used(self, server, monkeypatch, tmp_path):
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / 'envcache'))
    url = server.add('/ml-latest-small.zip', LATEST_ZIP)
    sources.load_movielens('ml-latest-small', url=url)
    assert listing(tmp_path / 'envcache') == ['ml-latest-small.zip']

  def test_corrupt_cache_entry_is_reported(self, tmp_path):
    (tmp_path / 'ml-1m.zip').write_bytes(b'garbage')
    with pytest.raises(errors.IntegrityError, match='corrupt cache entry') as e:
      sources.load_movielens('ml-1m', cache_dir=str(tmp_path))
    assert e.value.path == str(tmp_path / 'ml-1m.zip')
    (tmp_path / 'ml-1m.zip').unlink()
    (tmp_path / 'ml-100k.inter').write_bytes(open(fixture('small.inter'), 'rb').read())
    with pytest.raises(errors.IntegrityError, match='corrupt cache entry') as e:
      sources.load_movielens('ml-100k', cache_dir=str(tmp_path))  # checksum differs
    assert e.value.path == str(tmp_path / 'ml-100k.inter')


def fake_wheel(tmp_path, inter_fixture: str = 'small.inter', member=sources.RECBOLE_INTER_MEMBER):
  path = tmp_path / 'fake-1.0-py3-none-any.whl'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('recbole/__init__.py', '')
    z.write(fixture(inter_fixture), member)
  return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


class TestWheel:

  def test_extract_member_atomically(self, tmp_path):
    wheel, sha = fake_wheel(tmp_path)
    dest = tmp_path / 'cache' / 'ml-100k.inter'
    seen = []
    sources.extract_wheel_member(wheel, sources.RECBOLE_INTER_MEMBER, str(dest),
                                 expected_wheel_sha256=sha, verify=seen.append)
    assert dest.read_bytes() == open(fixture('small.inter'), 'rb').read()
    assert len(seen) == 1 and seen[0] != str(dest)  # verified before the rename
    assert listing(dest.parent) == ['ml-100k.inter']

  def test_wrong_wheel_sha256(self, tmp_path):
    wheel, _ = fake_wheel(tmp_path)
    cache = tmp_path / 'cache'
    with pytest.raises(errors.IntegrityError, match='wheel sha256') as e:
      sources.extract_wheel_member(wheel, sources.RECBOLE_INTER_MEMBER,
                                   str(cache / 'ml-100k.inter'), expected_wheel_sha256='0' * 64)
    assert e.value.path == wheel
    assert listing(cache) == []

  def test_member_missing_or_failing_verification(self, tmp_path):
    wheel, sha = fake_wheel(tmp_path, member='recbole/other.inter')
    cache = tmp_path / 'cache'
    with pytest.raises(errors.IntegrityError, match='not in zip'):
      sources.extract_wheel_member(wheel, sources.RECBOLE_INTER_MEMBER,
                                   str(cache / 'ml-100k.inter'), expected_wheel_sha256=sha)
    assert listing(cache) == []
    wheel, sha = fake_wheel(tmp_path)
    with pytest.raises(errors.IntegrityError, match='differs from the published'):
      sources.extract_wheel_member(wheel, sources.RECBOLE_INTER_MEMBER,
                                   str(cache / 'ml-100k.inter'), expected_wheel_sha256=sha,
                                   verify=sources._check_inter)
    assert listing(cache) == []

  def test_fallback_to_wheel_when_download_fails(self, monkeypatch, tmp_path):
    wheel, sha = fake_wheel(tmp_path)
    fixture_sum = checksum.content_checksum(open(fixture('u.data')).read().splitlines())
    monkeypatch.setitem(checksum.KNOWN_CHECKSUMS, 'ml-100k', fixture_sum)
    monkeypatch.setattr(sources, 'RECBOLE_WHEEL_SHA256', sha)
    calls = []

    def fake_pip(requirement, wheel_name, directory, timeout=0):
      calls.append(requirement)
      return wheel

    monkeypatch.setattr(sources, 'pip_download', fake_pip)
    cache = tmp_path / 'cache'
    r, info = sources.load_movielens('ml-100k', cache_dir=str(cache))  # GroupLens refused
    assert calls == ['recbole==1.2.1']
    assert info.origin == 'recbole_wheel' and info.checksum_verified
    assert raw_records(r) == U_DATA
    assert listing(cache) == ['ml-100k.inter']
    r2, info2 = sources.load_movielens('ml-100k', cache_dir=str(cache))
    assert info2.origin == 'cache' and calls == ['recbole==1.2.1']
    assert raw_records(r2) == U_DATA

  def test_no_fallback_for_other_sets_or_integrity_errors(self, server, monkeypatch, tmp_path):
    with pytest.raises(sources.DownloadError):
      sources.load_movielens('ml-1m', cache_dir=str(tmp_path))
    url = server.add('/ml-100k.zip', ML100K_FAKE_ZIP)
    with pytest.raises(errors.IntegrityError):  # a bad download is not papered over
      sources.load_movielens('ml-100k', cache_dir=str(tmp_path), url=url)

  def test_pip_failure_is_download_error(self, monkeypatch, tmp_path):

    def failing_run(cmd, **kwargs):
      assert cmd[1:4] == ['-m', 'pip', 'download'] and '--no-deps' in cmd
      return subprocess.CompletedProcess(cmd, 1, '', 'ERROR: No matching distribution')

    monkeypatch.setattr(sources.subprocess, 'run', failing_run)
    with pytest.raises(sources.DownloadError, match='No matching distribution'):
      REAL_PIP_DOWNLOAD('recbole==1.2.1', sources.RECBOLE_WHEEL, str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TFF_REC_SKIP_PIP_TESTS') == '1',
                    reason='TFF_REC_SKIP_PIP_TESTS=1')
def test_real_recbole_wheel(monkeypatch, tmp_path):
  """`pip download recbole==1.2.1` for real (pip caches it: ~1 s)."""
  monkeypatch.setattr(sources, 'pip_download', REAL_PIP_DOWNLOAD)
  cache = tmp_path / 'cache'
  r, info = sources.load_movielens('ml-100k', cache_dir=str(cache))
  assert info.origin == 'recbole_wheel' and info.checksum_verified
  assert info.checksum == checksum.KNOWN_CHECKSUMS['ml-100k']
  assert (r.num_ratings, r.num_users, r.num_items) == (100_000, 943, 1682)
  assert listing(cache) == ['ml-100k.inter']
  _, info2 = sources.load_movielens('ml-100k', cache_dir=str(cache))
  assert info2.origin == 'cache'


class TestSharedData:

  def test_real_zips_as_data_dir(self):
    folder = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
    r, info = sources.load_movielens('ml-100k', data_dir=folder)
    assert info.checksum_verified and info.origin == 'data_dir'
    assert info.fold_source == os.path.join(folder, 'ml-100k.zip')
    assert info.user_catalog.endswith('ml-100k.zip/ml-100k/u.user')
    assert (r.num_ratings, r.num_users, r.num_items) == (100_000, 943, 1682)
    r, info = sources.load_movielens('ml-latest-small', data_dir=folder)
    assert (r.num_ratings, r.num_users, r.num_items) == (100_836, 610, 9724)

  def test_real_ml100k_over_http_is_verified(self, server, tmp_path):
    body = open(shared_data.shared_file('ml-100k.zip'), 'rb').read()
    url = server.add('/ml-100k.zip', body)
    r, info = sources.load_movielens('ml-100k', cache_dir=str(tmp_path), url=url,
                                     expected_sha256=hashlib.sha256(body).hexdigest())
    assert info.origin == 'download' and info.checksum_verified
    assert info.fold_source == str(tmp_path / 'ml-100k.zip')
    assert listing(tmp_path) == ['ml-100k.zip']


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
