#!/usr/bin/env python3
"""Regenerates the Bazel BUILD files from the Python sources.

One target per .py file (py_test for *_test.py, py_binary for absl binaries in
experiments/ and benchmarks/, else py_library), deps = the in-repo modules it
imports plus `requirement("<pip name>")` for each third-party package it
imports (the rules_python way; `@pypi` is rules_python's pip hub under
MODULE.bazel, or offline the in-repo hub tools/bazel/pypi under WORKSPACE),
and as `data`: for tests that run a binary in a subprocess (`-m
experiments.x`) that binary, the package's `testdata/` files, and the flag
files (`//experiments:flags`) for tests that read them. Every test file ends
with a main that runs pytest on it, so `bazel test` runs it.
tests/build_files_test.py checks the committed files match the code.

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
# A script that runs under another interpreter (e.g. a reference implementation's
# own environment) starts with this line: it becomes a filegroup, data of the files
# that name it, and its imports are not the toolkit's dependencies.
FOREIGN_MARKER = '# tff-rec: runs under another interpreter'
_BINARY_RUN = re.compile(r'-m[\'", ]+((?:experiments|benchmarks)\.[a-z_0-9]+)')
# Import name -> pip distribution (as pinned in requirements*.txt / constraints.txt).
THIRD_PARTY = {
    'absl': 'absl-py',
    'cryptography': 'cryptography',
    'dp_accounting': 'dp-accounting',
    'google': 'protobuf',
    'grpc': 'grpcio',
    'matplotlib': 'matplotlib',
    'numpy': 'numpy',
    'portpicker': 'portpicker',
    'psutil': 'psutil',
    'pytest': 'pytest',
    'safetensors': 'safetensors',
    'scipy': 'scipy',
    'tensorflow': 'tensorflow',
    'tensorflow_federated': 'tensorflow-federated',
    'tensorflow_model_optimization': 'tensorflow-model-optimization',
    'tensorflow_privacy': 'tensorflow-privacy',
    'tensorflow_recommenders': 'tensorflow-recommenders',
    'tenseal': 'tenseal',
    'tokenizers': 'tokenizers',
    'tensorflow_serving': 'tensorflow-serving-api',
    'tqdm': 'tqdm',
}
TEST_MAIN = """

if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
"""


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


def third_party(path: str) -> set:
  """The pip distributions `path` imports; KeyError naming an unknown package."""
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
      if top in sys.stdlib_module_names or top in PACKAGES or top == 'tools':
        continue
      if top not in THIRD_PARTY:
        raise KeyError(f'{path} imports {top}: add its pip name to THIRD_PARTY in '
                       'tools/update_build.py (and pin it in requirements.txt)')
      out.add(THIRD_PARTY[top])
  return out


def is_binary(path: str, text: str) -> bool:
  return path.startswith(('experiments/', 'benchmarks/')) and 'app.run(' in text


def label(path: str) -> str:
  package, name = os.path.split(path)
  return f'//{package}:{name[:-3]}'


def render(package: str, files: list) -> str:
  kinds, blocks, uses_requirement = set(), [], False
  texts = {}
  for f in files:
    with open(os.path.join(ROOT, package, f)) as fh:
      texts[f] = fh.read()
  foreign = sorted(f for f in files if texts[f].startswith(FOREIGN_MARKER + '\n'))
  for f in files:
    path = os.path.join(package, f)
    text = texts[f]
    if f in foreign:
      blocks.append(f'filegroup(\n    name = "{f[:-3]}",\n    srcs = ["{f}"],\n)')
      continue
    if f.endswith('_test.py'):
      kind = 'py_test'
      if not text.endswith(TEST_MAIN):
        raise ValueError(f'{path} must end with the pytest main (tools/update_build.py '
                         '--add_test_mains adds it)')
    elif is_binary(path, text):
      kind = 'py_binary'
    else:
      kind = 'py_library'
    kinds.add(kind)
    deps = sorted(
        (':' + os.path.basename(p)[:-3]) if os.path.dirname(p) == package else label(p)
        for p in imported_files(path) if p != path)
    deps.sort(key=lambda d: (not d.startswith(':'), d))
    deps += [f'requirement("{r}")' for r in sorted(third_party(path))]
    data = [f':{g[:-3]}' for g in foreign if g in text]
    if kind == 'py_test':
      data += sorted({'//' + m.replace('.', ':', 1) for m in _BINARY_RUN.findall(text)})
      if 'experiments/flags' in text or "'flags'" in text:
        data.append('//experiments:flags')
      if 'testdata' in text and os.path.isdir(os.path.join(ROOT, package, 'testdata')):
        data.append('glob(["testdata/**"])')
    uses_requirement = uses_requirement or any(d.startswith('requirement(') for d in deps)
    lines = [f'{kind}(', f'    name = "{f[:-3]}",', f'    srcs = ["{f}"],']
    for attr, values in (('data', data), ('deps', deps)):
      globs = [v for v in values if v.startswith('glob(')]
      quoted = [v if v.startswith('requirement(') else f'"{v}"' for v in values if v not in globs]
      tail = ''.join(f' + {g}' for g in globs)
      if not quoted and globs:
        lines.append(f'    {attr} = {" + ".join(globs)},')
      elif len(quoted) == 1:
        lines.append(f'    {attr} = [{quoted[0]}]{tail},')
      elif quoted:
        lines.append(f'    {attr} = [')
        lines.extend(f'        {v},' for v in quoted)
        lines.append(f'    ]{tail},')
    lines.append(')')
    blocks.append('\n'.join(lines))
  if package == 'experiments' and os.path.isdir(os.path.join(ROOT, 'experiments', 'flags')):
    blocks.append('filegroup(\n    name = "flags",\n    srcs = glob(["flags/*.cfg"]),\n)')
  load = ', '.join(f'"{k}"' for k in sorted(kinds))
  header = f'load("@rules_python//python:defs.bzl", {load})\n'
  if uses_requirement:
    header += 'load("@pypi//:requirements.bzl", "requirement")\n'
  header += '\npackage(default_visibility = ["//visibility:public"])\n'
  return header + '\n' + '\n\n'.join(blocks) + '\n'


def add_test_main(path: str) -> bool:
  """Appends the pytest main (and its imports) to a test file without one."""
  with open(path) as f:
    text = f.read()
  if text.endswith(TEST_MAIN):
    return False
  lines = text.rstrip('\n').split('\n')
  tree = ast.parse(text)
  imported = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
  first = next(n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.module == '__future__'))
  missing = [f'import {m}' for m in ('sys', 'pytest') if m not in imported]
  lines[first - 1:first - 1] = missing
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n' + TEST_MAIN)
  return True


def main(argv) -> int:
  if '--add_test_mains' in argv:
    for package, files in python_dirs():
      for f in files:
        if f.endswith('_test.py') and add_test_main(os.path.join(ROOT, package, f)):
          print(f'added the pytest main to {package}/{f}')
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
