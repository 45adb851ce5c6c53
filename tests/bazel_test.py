"""Bazel reads the BUILD files: `bazel query //...` and a build of every library.

Runs with Debian's `bazel-bootstrap` (Bazel 4.2.3) and the offline WORKSPACE
(tools/bazel/: built-in Python rules, a pip hub standing for .venv). Bazel
4 downloads `@rules_cc` for the launcher of py_binary / py_test targets, which
this machine cannot, so binaries and tests are queried, not built (see
CONTRIBUTING.md, "Bazel"). `--batch` leaves no Bazel server running. Skipped
without `bazel` on PATH, unless TFF_REC_REQUIRE_BAZEL=1 (CI installs it).
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests import shared_data

_BAZEL = shutil.which('bazel')
_LIBRARIES = ['//tff_rec/...', '//privacy/...', '//compression/...', '//experiments/tables/...']

pytestmark = pytest.mark.skipif(
    _BAZEL is None and os.environ.get('TFF_REC_REQUIRE_BAZEL') != '1',
    reason='bazel is not installed (apt-get install bazel-bootstrap)')


def _bazel(tmp_path_factory, *args):
  if _BAZEL is None:
    pytest.fail('TFF_REC_REQUIRE_BAZEL=1 but bazel is not on PATH')
  root = str(tmp_path_factory.getbasetemp() / 'bazel_root')
  proc = subprocess.run([_BAZEL, '--batch', f'--output_user_root={root}', *args],
                        cwd=shared_data.REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def _python_files(top):
  for dirpath, dirnames, filenames in os.walk(os.path.join(shared_data.REPO_ROOT, top)):
    dirnames[:] = [d for d in dirnames if not d.startswith(('.', '__')) and d != 'testdata']
    for f in filenames:
      if f.endswith('.py') and f not in ('__init__.py', 'conftest.py'):
        yield os.path.relpath(os.path.join(dirpath, f), shared_data.REPO_ROOT)


def test_query_lists_a_target_for_every_python_file(tmp_path_factory):
  labels = set(_bazel(tmp_path_factory, 'query', '//...').split())
  for top in ('tff_rec', 'privacy', 'compression', 'experiments', 'benchmarks', 'tests'):
    for path in _python_files(top):
      package, name = os.path.split(path)
      assert f'//{package}:{name[:-3]}' in labels, f'bazel query has no target for {path}'


def test_libraries_build_and_declare_their_pip_packages(tmp_path_factory):
  _bazel(tmp_path_factory, 'build', '--symlink_prefix=/', *_LIBRARIES)  # no bazel-* links
  deps = set(_bazel(tmp_path_factory, 'query', 'deps(//experiments/tables:privacy_ml1m)').split())
  for package in ('tensorflow', 'tensorflow_federated', 'tensorflow_privacy', 'dp_accounting',
                  'numpy'):
    assert f'@pypi//:{package}' in deps


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
