"""The stack versions tff-rec is built for, a check that refuses others, the source commit
and the machine."""

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Callable, Mapping, Optional

__version__ = '0.1.0'

# Distribution name -> the exact version this toolkit was built and tested on.
STACK_VERSIONS: Mapping[str, str] = {
    'tensorflow': '2.14.1',
    'tensorflow-federated': '0.87.0',
    'tensorflow-privacy': '0.9.0',
    'tensorflow-model-optimization': '0.7.5',
    'dp-accounting': '0.4.3',
}

# The versions whose mismatch refuses to start (the rest only warn).
_REQUIRED = ('tensorflow', 'tensorflow-federated')


class StackVersionError(RuntimeError):
  """An installed TensorFlow / TFF version that tff-rec was not built for."""


def installed_versions(
    get_version: Callable[[str], str] = importlib.metadata.version,
) -> dict[str, Optional[str]]:
  """The installed version of each stack distribution (None if missing)."""
  found = {}
  for name in STACK_VERSIONS:
    try:
      found[name] = get_version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def stack_mismatches(installed: Mapping[str, Optional[str]]) -> list[str]:
  """Human-readable lines for each stack package that differs from STACK_VERSIONS."""
  problems = []
  for name, expected in STACK_VERSIONS.items():
    got = installed.get(name)
    if got != expected:
      problems.append(f'{name}=={expected} expected, found {got or "not installed"}')
  return problems


def check_stack(installed: Optional[Mapping[str, Optional[str]]] = None) -> None:
  """Raises StackVersionError unless TF and TFF are the versions built for.

  Reads package metadata only, so it runs before TensorFlow is imported.
  """
  installed = installed_versions() if installed is None else installed
  fatal = []
  for name in _REQUIRED:
    if installed.get(name) != STACK_VERSIONS[name]:
      fatal.append(
          f'{name}=={STACK_VERSIONS[name]} expected, found '
          f'{installed.get(name) or "not installed"}'
      )
  if fatal:
    raise StackVersionError(
        'tff-rec {} was built for tensorflow {} and tensorflow-federated {} '
        'and refuses to start on other versions:\n  {}\n'
        'Run `make setup` (tools/setup_env.sh) to install the pinned stack '
        'into .venv, and run tff-rec from that environment.'.format(
            __version__,
            STACK_VERSIONS['tensorflow'],
            STACK_VERSIONS['tensorflow-federated'],
            '\n  '.join(fatal),
        )
    )


def stack_summary() -> str:
  """One line naming tff-rec's version and the installed stack versions."""
  parts = [f'tff-rec {__version__}']
  for name, got in installed_versions().items():
    parts.append(f'{name} {got or "missing"}')
  return ', '.join(parts)


def source_commit() -> Optional[str]:
  """The checked-out commit of the source tree (read-only), if it is a git clone."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                         timeout=10, check=False)
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                           capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() + ('+local-changes' if dirty.stdout.strip() else '')


def cpu_model() -> str:
  """The CPU model name (from /proc/cpuinfo where available)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict:
  """Cores, RAM, CPU model, OS and Python of this machine."""
  info = {'cores': os.cpu_count(), 'platform': platform.platform(),
          'python': sys.version.split()[0], 'cpu': cpu_model(), 'ram_gb': None}
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          info['ram_gb'] = round(int(line.split()[1]) / 1024 / 1024, 1)
          break
  except OSError:
    pass
  return info
