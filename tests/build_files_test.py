"""The Bazel BUILD files stay in step with the code.

Every Python file has exactly one target in its directory's BUILD file
(`py_test` for `*_test.py`, `py_binary` for absl binaries, else
`py_library`), every in-repo import of a target's sources is one of its
`deps`, every third-party import is a `requirement("<pip name>")` dep whose
package is pinned, every dep names a target that exists, every test can run
as a Bazel test (it ends with a pytest main), and the root has a BUILD file.
"""

import sys
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
    def add(name, srcs=(), deps=(), data=(), **_):
      assert name not in targets, f'{path}: duplicate target {name}'
      targets[name] = {'kind': kind, 'srcs': list(srcs), 'deps': list(deps), 'data': list(data)}
    return add

  env = {
      'load': lambda *a, **k: None,
      'py_library': rule('py_library'),
      'py_binary': rule('py_binary'),
      'py_test': rule('py_test'),
      'filegroup': lambda name, srcs=(), **k: rule('filegroup')(
          name, [x for x in srcs if not x.startswith('glob:')]),
      'exports_files': lambda *a, **k: None,
      'glob': lambda patterns, **k: [f'glob:{p}' for p in patterns],
      'package': lambda **k: None,
      'requirement': lambda name: f'@pypi//:{name}',
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
# tools/update_build.py: a script run by another interpreter (its first line) is a filegroup.
FOREIGN_MARKER = '# tff-rec: runs under another interpreter'


def _is_foreign(path: str) -> bool:
  with open(os.path.join(ROOT, path)) as f:
    return f.read().startswith(FOREIGN_MARKER + '\n')


@pytest.mark.parametrize('path', FILES)
def test_every_python_file_has_one_target_of_the_right_kind(path):
  owners = OWNER.get(path, [])
  assert len(owners) == 1, f'{path} is in {len(owners)} BUILD targets ({owners}); expected one'
  kind = TARGETS[owners[0]]['kind']
  if _is_foreign(path):
    expected = 'filegroup'
  elif os.path.basename(path).endswith('_test.py'):
    expected = 'py_test'
  elif _is_binary(path):
    expected = 'py_binary'
  else:
    expected = 'py_library'
  assert kind == expected, f'{path}: {owners[0]} is a {kind}, expected {expected}'


@pytest.mark.parametrize('path', FILES)
def test_in_repo_imports_are_declared_deps(path):
  if _is_foreign(path):
    assert not _imports(path), f'{path} runs under another interpreter: it cannot import the toolkit'
    return
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


def _pins() -> set:
  pins = set()
  for name in ('requirements.txt', 'requirements-nodeps.txt', 'constraints.txt'):
    with open(os.path.join(ROOT, name)) as f:
      for line in f:
        line = line.split('#')[0].strip()
        if '==' in line:
          pins.add(line.split('==')[0].strip().lower().replace('_', '-'))
  return pins


def _third_party(path: str) -> set:
  """Top-level names of the non-standard-library, non-repo modules `path` imports."""
  import sys  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module]
    else:
      continue
    for name in names:
      top = name.split('.')[0]
      if top not in sys.stdlib_module_names and top not in PACKAGES + ('tools',):
        out.add(top)
  return out


@pytest.mark.parametrize('path', FILES)
def test_third_party_imports_are_pinned_requirement_deps(path):
  if _is_foreign(path):
    return  # its imports are its own interpreter's, not the toolkit's
  target = TARGETS[OWNER[path][0]]
  declared = {d.split(':', 1)[1] for d in target['deps'] if d.startswith('@pypi//:')}
  pins = _pins()
  for dep in declared:
    assert dep in pins, f'{path}: requirement("{dep}") is not pinned in requirements*.txt'
  for top in _third_party(path):
    # The import name must map to a declared distribution (e.g. absl -> absl-py).
    candidates = {d for d in declared if d.replace('-', '_').startswith(top) or
                  {'absl': 'absl-py', 'google': 'protobuf', 'grpc': 'grpcio',
                   'tensorflow_serving': 'tensorflow-serving-api'}.get(top) == d}
    assert candidates, f'{path} imports {top} but its target has no requirement() for it'


@pytest.mark.parametrize('path', [f for f in FILES if f.endswith('_test.py')])
def test_tests_run_as_bazel_tests(path):
  """`bazel test` runs the file as a program: it must end by running pytest on itself."""
  with open(os.path.join(ROOT, path)) as f:
    text = f.read()
  assert text.rstrip().endswith("sys.exit(pytest.main([__file__, '-q']))"), path
  target = TARGETS[OWNER[path][0]]
  if 'testdata' in text and os.path.isdir(os.path.join(ROOT, target['package'], 'testdata')):
    assert 'glob:testdata/**' in target['data'], f'{path} reads testdata/ but has no data dep'


def test_the_root_has_a_build_file_and_a_workspace():
  for name in ('BUILD', 'WORKSPACE', 'MODULE.bazel'):
    assert os.path.isfile(os.path.join(ROOT, name)), name


def test_every_dep_exists():
  for label, target in TARGETS.items():
    for dep in target['deps']:
      if dep.startswith('@pypi//:'):
        continue  # checked against the pins above
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


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
