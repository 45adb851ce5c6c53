#!/usr/bin/env python3
"""Regenerates the Bazel BUILD files from the Python sources.

One target per .py file (py_test for *_test.py, py_binary for absl binaries in
experiments/ and benchmarks/, else py_library), deps = the in-repo modules it
imports, and for tests that run a binary in a subprocess (`-m experiments.x`)
that binary as `data`. tests/build_files_test.py checks the committed files
match the code.

  python3 tools/update_build.py          # rewrite BUILD files
  python3 tools/update_build.py --check  # exit 1 if any would change
"""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('tff_rec', 'privacy', 'compression', 'experiments', 'benchmarks', 'tests')
SKIP = {'__init__.py', 'conftest.py'}
_BINARY_RUN = re.compile(r'-m[\'", ]+((?:experiments|benchmarks)\.[a-z_0-9]+)')


def python_dirs():
  for top in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__')) and d != 'testdata')
      files = sorted(f for f in filenames if f.endswith('.py') and f not in SKIP)
      if files:
        yield os.path.relpath(dirpath, ROOT), files


def imported_files(path: str) -> set:
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  out = set()
  for name in names:
    if name.split('.')[0] not in PACKAGES:
      continue
    candidate = name.replace('.', '/') + '.py'
    if os.path.isfile(os.path.join(ROOT, candidate)) and os.path.basename(candidate) not in SKIP:
      out.add(candidate)
  return out


def is_binary(path: str, text: str) -> bool:
  return path.startswith(('experiments/', 'benchmarks/')) and 'app.run(' in text


def label(path: str) -> str:
  package, name = os.path.split(path)
  return f'//{package}:{name[:-3]}'


def render(package: str, files: list) -> str:
  kinds, blocks = set(), []
  for f in files:
    path = os.path.join(package, f)
    with open(os.path.join(ROOT, path)) as fh:
      text = fh.read()
    if f.endswith('_test.py'):
      kind = 'py_test'
    elif is_binary(path, text):
      kind = 'py_binary'
    else:
      kind = 'py_library'
    kinds.add(kind)
    deps = sorted(
        (':' + os.path.basename(p)[:-3]) if os.path.dirname(p) == package else label(p)
        for p in imported_files(path) if p != path)
    deps.sort(key=lambda d: (not d.startswith(':'), d))
    data = sorted({'//' + m.replace('.', ':', 1) for m in _BINARY_RUN.findall(text)}) if kind == 'py_test' else []
    lines = [f'{kind}(', f'    name = "{f[:-3]}",', f'    srcs = ["{f}"],']
    for attr, values in (('data', data), ('deps', deps)):
      if len(values) == 1:
        lines.append(f'    {attr} = ["{values[0]}"],')
      elif values:
        lines.append(f'    {attr} = [')
        lines.extend(f'        "{v}",' for v in values)
        lines.append('    ],')
    lines.append(')')
    blocks.append('\n'.join(lines))
  load = ', '.join(f'"{k}"' for k in sorted(kinds))
  header = f'load("@rules_python//python:defs.bzl", {load})\n\npackage(default_visibility = ["//visibility:public"])\n'
  return header + '\n' + '\n\n'.join(blocks) + '\n'


def main(argv) -> int:
  check = '--check' in argv
  stale = []
  for package, files in python_dirs():
    path = os.path.join(ROOT, package, 'BUILD')
    content = render(package, files)
    current = open(path).read() if os.path.exists(path) else None
    if current != content:
      stale.append(os.path.relpath(path, ROOT))
      if not check:
        with open(path, 'w') as f:
          f.write(content)
  if check and stale:
    print('stale BUILD files (run tools/update_build.py):\n  ' + '\n  '.join(stale))
    return 1
  if not check:
    print(f'updated {len(stale)} BUILD file(s)')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
