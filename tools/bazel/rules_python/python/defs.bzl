"""Offline stand-in for rules_python's defs.bzl: Bazel's built-in Python rules.

Used only by the WORKSPACE set-up (see //:WORKSPACE); with Bzlmod,
MODULE.bazel brings the real rules_python.
"""

def py_library(**kwargs):
    native.py_library(**kwargs)

def py_binary(**kwargs):
    native.py_binary(python_version = "PY3", **kwargs)

def py_test(**kwargs):
    native.py_test(python_version = "PY3", **kwargs)
