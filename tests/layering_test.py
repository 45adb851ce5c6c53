"""Dependencies run one way: no module imports from a layer above its own.

The layers, bottom to top (CONTRIBUTING.md, "Architecture"):

  0  tff_rec/*.py            atomic writes, runtime, versions, errors
  1  tff_rec.data, tff_rec.models
  2  tff_rec.training
  3  tff_rec.export, tff_rec.distributed
  4  privacy, compression     (each builds on tff_rec; neither on the other)
  5  experiments              binaries, flag parsing, the published tables
  6  benchmarks

A package may import itself, and any package of a lower layer; packages of
the same layer may not import each other. Imports inside functions count
(they are dependencies all the same). tests/ and tools/ may import anything.
"""

import sys
import ast
import os

import pytest

from tests import shared_data

_LAYERS = {
    'tff_rec': 0,
    'tff_rec.data': 1,
    'tff_rec.models': 1,
    'tff_rec.training': 2,
    'tff_rec.export': 3,
    'tff_rec.distributed': 3,
    'privacy': 4,
    'compression': 4,
    'experiments': 5,
    'benchmarks': 6,
}
_ROOTS = ('tff_rec', 'privacy', 'compression', 'experiments', 'benchmarks')


def _package(module: str) -> str:
  """The layered package a dotted module name belongs to."""
  parts = module.split('.')
  if parts[0] == 'tff_rec' and len(parts) > 1 and 'tff_rec.' + parts[1] in _LAYERS:
    return 'tff_rec.' + parts[1]
  return parts[0]


def _modules():
  for root in _ROOTS:
    for dirpath, _, files in os.walk(os.path.join(shared_data.REPO_ROOT, root)):
      for name in sorted(files):
        if name.endswith('.py'):
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, shared_data.REPO_ROOT)
          yield rel, rel[:-3].replace(os.sep, '.')


def _imports(path: str):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        yield node.lineno, f'{node.module}.{alias.name}'


def violations():
  """(file, line, importer package, imported module) for each import against the layering."""
  out = []
  for rel, module in _modules():
    source = _package(module)
    for line, imported in _imports(os.path.join(shared_data.REPO_ROOT, rel)):
      if imported.split('.')[0] not in _ROOTS + ('tests', 'tools'):
        continue  # third party or standard library
      target = _package(imported)
      if target == source:
        continue
      if target not in _LAYERS or _LAYERS[target] >= _LAYERS[source]:
        out.append((rel, line, source, imported))
  return out


def test_no_module_imports_from_its_own_layer_or_above():
  found = [f'{rel}:{line}: {source} (layer {_LAYERS[source]}) imports {imported}'
           for rel, line, source, imported in violations()]
  assert not found, 'imports against the layering:\n' + '\n'.join(found)


def test_every_package_has_a_layer():
  packages = {_package(module) for _, module in _modules()}
  assert packages <= set(_LAYERS), packages - set(_LAYERS)


@pytest.mark.parametrize('source,imported', [
    ('tff_rec/training/loop.py', 'privacy.accounting'),
    ('privacy/audit.py', 'compression.pruning'),
    ('tff_rec/data/readers.py', 'tff_rec.training.loop'),
    ('compression/pruning.py', 'experiments.tables.harness'),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, imported):
  root = tmp_path / 'repo'
  path = root / source
  path.parent.mkdir(parents=True)
  path.write_text(f'import {imported}\n')
  monkeypatch.setattr(shared_data, 'REPO_ROOT', str(root))
  assert [(rel, src, imp) for rel, _, src, imp in violations()] == \
      [(source, _package(source[:-3].replace('/', '.')), imported)]



def test_public_builders_document_their_arguments():
  """`build*` / `make*` functions of the library with two or more arguments have Args/Returns."""
  missing = []
  for rel, _ in _modules():
    if not rel.startswith(('tff_rec', 'privacy', 'compression')):
      continue
    with open(os.path.join(shared_data.REPO_ROOT, rel)) as f:
      tree = ast.parse(f.read(), rel)
    for node in tree.body:
      if (isinstance(node, ast.FunctionDef) and node.name.startswith(('build', 'make'))
          and len(node.args.args) + len(node.args.kwonlyargs) >= 2):
        doc = ast.get_docstring(node) or ''
        if 'Args:' not in doc or 'Returns:' not in doc:
          missing.append(f'{rel}: {node.name}')
  assert not missing, 'public builders without Args/Returns docs:\n' + '\n'.join(missing)


def _flag_definitions(tree):
  """(line, assigned?) of each `flags.DEFINE_*` call at any depth."""
  assigned = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
      assigned.add(id(node.value))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('DEFINE_') and isinstance(node.func.value, ast.Name)
        and node.func.value.id == 'flags'):
      yield node.lineno, id(node) in assigned


def test_one_flag_style_and_no_flags_in_the_library():
  """Binaries define flags as `flags.DEFINE_*(...)` read through `FLAGS.name`; the library has none."""
  problems = []
  for rel, _ in _modules():
    with open(os.path.join(shared_data.REPO_ROOT, rel)) as f:
      tree = ast.parse(f.read(), rel)
    for line, assigned in _flag_definitions(tree):
      if rel.startswith(('tff_rec', 'privacy', 'compression')):
        problems.append(f'{rel}:{line}: a flag in the library (flags belong to binaries)')
      elif assigned:
        problems.append(f'{rel}:{line}: a FlagHolder (`_X = flags.DEFINE_...`); use '
                        '`flags.DEFINE_...(...)` and `FLAGS.name`')
  assert not problems, '\n'.join(problems)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
