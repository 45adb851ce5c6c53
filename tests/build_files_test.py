"""The Bazel BUILD files stay in step with the code.

Every Python file has exactly one target in its directory's BUILD file
(`py_test` for `*_test.py`, `py_binary` for absl binaries, else
`py_library`), every in-repo import of a target's sources is one of its
`deps`, and every dep names a target that exists.
"""

import ast
import os

import pytest

from tests import shared_data

ROOT = shared_data.REPO_ROOT
PACKAGES = ('tff_rec', 'privacy', 'compression', 'experiments', 'benchmarks', 'tests')
_SKIP_FILES = {'__init__.py', 'conftest.py'}


def _python_files():
  for top in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if not d.startswith(('.', '__')) and d != 'testdata']
      for f in filenames:
        if f.endswith('.py') and f not in _SKIP_FILES:
          yield os.path.relpath(os.path.join(dirpath, f), ROOT)


def _load_build(package: str) -> dict:
  """Targets of `package`/BUILD: name -> {kind, srcs, deps}."""
  path = os.path.join(ROOT, package, 'BUILD')
  targets = {}

  def rule(kind):
    def add(name, srcs=(), deps=(), **_):
      assert name not in targets, f'{path}: duplicate target {name}'
      targets[name] = {'kind': kind, 'srcs': list(srcs), 'deps': list(deps)}
    return add

  env = {
      'load': lambda *a, **k: None,
      'py_library': rule('py_library'),
      'py_binary': rule('py_binary'),
      'py_test': rule('py_test'),
      'filegroup': lambda **k: None,
      'exports_files': lambda *a, **k: None,
      'glob': lambda *a, **k: [],
      'package': lambda **k: None,
  }
  with open(path) as f:
    exec(compile(f.read(), path, 'exec'), env)  # pylint: disable=exec-used
  return targets


def _all_targets() -> dict:
  """'//pkg:name' -> target, over every BUILD file in the repo."""
  out = {}
  for top in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if not d.startswith(('.', '__'))]
      if 'BUILD' in filenames:
        package = os.path.relpath(dirpath, ROOT)
        for name, t in _load_build(package).items():
          out[f'//{package}:{name}'] = dict(t, package=package)
  return out


TARGETS = _all_targets()
# module path (e.g. 'tff_rec/data/ratings.py') -> label
OWNER = {}
for _label, _t in TARGETS.items():
  for _src in _t['srcs']:
    OWNER.setdefault(os.path.join(_t['package'], _src), []).append(_label)


def _imports(path: str) -> set:
  """In-repo module files imported by `path`."""
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  files = set()
  for name in names:
    if name.split('.')[0] not in PACKAGES:
      continue
    candidate = name.replace('.', '/') + '.py'
    if os.path.isfile(os.path.join(ROOT, candidate)) and os.path.basename(candidate) not in _SKIP_FILES:
      files.add(candidate)
  return files


def _is_binary(path: str) -> bool:
  with open(os.path.join(ROOT, path)) as f:
    text = f.read()
  return 'app.run(' in text and path.startswith(('experiments/', 'benchmarks/'))


FILES = sorted(_python_files())


@pytest.mark.parametrize('path', FILES)
def test_every_python_file_has_one_target_of_the_right_kind(path):
  owners = OWNER.get(path, [])
  assert len(owners) == 1, f'{path} is in {len(owners)} BUILD targets ({owners}); expected one'
  kind = TARGETS[owners[0]]['kind']
  if os.path.basename(path).endswith('_test.py'):
    expected = 'py_test'
  elif _is_binary(path):
    expected = 'py_binary'
  else:
    expected = 'py_library'
  assert kind == expected, f'{path}: {owners[0]} is a {kind}, expected {expected}'


@pytest.mark.parametrize('path', FILES)
def test_in_repo_imports_are_declared_deps(path):
  label = OWNER[path][0]
  target = TARGETS[label]
  declared = set()
  for dep in target['deps']:
    if dep.startswith(':'):
      dep = f'//{target["package"]}{dep}'
    declared.add(dep)
  for imported in _imports(path):
    owners = OWNER.get(imported)
    assert owners, f'{path} imports {imported}, which no BUILD target owns'
    if imported in [os.path.join(target['package'], s) for s in target['srcs']]:
      continue
    assert owners[0] in declared, f'{label} ({path}) imports {imported} but lacks dep {owners[0]}'


def test_every_dep_exists():
  for label, target in TARGETS.items():
    for dep in target['deps']:
      full = f'//{target["package"]}{dep}' if dep.startswith(':') else dep
      assert full in TARGETS, f'{label} depends on {dep}, which does not exist'


def test_every_src_exists():
  for label, target in TARGETS.items():
    for src in target['srcs']:
      assert os.path.isfile(os.path.join(ROOT, target['package'], src)), f'{label}: missing {src}'


def test_build_files_match_the_generator():
  """`tools/update_build.py --check`: BUILD files are regenerated, not stale."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'update_build.py'), '--check'],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
