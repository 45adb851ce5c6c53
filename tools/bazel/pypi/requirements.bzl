"""Offline pip hub: `requirement(name)` as in rules_python's pip_parse hubs.

Each label names a `py_library` in this repository's BUILD that stands for a
package pinned in requirements.txt / requirements-nodeps.txt and installed in
.venv by `make setup` (Bazel's Python runs with that environment).
"""

def requirement(name):
    return "@pypi//:" + name.lower().replace("-", "_").replace(".", "_")
