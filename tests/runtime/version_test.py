"""The toolkit states its stack and refuses TF/TFF versions it was not built for."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests import shared_data
from tff_rec import version


def test_check_stack_accepts_the_pinned_versions():
  version.check_stack(dict(version.STACK_VERSIONS))


@pytest.mark.parametrize('package', ['tensorflow', 'tensorflow-federated'])
def test_check_stack_refuses_other_versions(package):
  installed = dict(version.STACK_VERSIONS)
  installed[package] = '9.9.9'
  with pytest.raises(version.StackVersionError) as e:
    version.check_stack(installed)
  message = str(e.value)
  assert f'{package}=={version.STACK_VERSIONS[package]} expected, found 9.9.9' in message
  assert 'make setup' in message


def test_check_stack_refuses_missing_tff():
  installed = dict(version.STACK_VERSIONS, **{'tensorflow-federated': None})
  with pytest.raises(version.StackVersionError, match='not installed'):
    version.check_stack(installed)


def test_installed_stack_matches():
  assert version.stack_mismatches(version.installed_versions()) == []
  assert 'tensorflow-federated 0.87.0' in version.stack_summary()


def test_import_refuses_wrong_tf_with_a_clear_message(tmp_path):
  # A sitecustomize that makes importlib.metadata report another TF version.
  (tmp_path / 'sitecustomize.py').write_text(textwrap.dedent('''
      import importlib.metadata as md
      _real = md.version
      def version(name):
        return '2.15.0' if name == 'tensorflow' else _real(name)
      md.version = version
  '''))
  env = dict(os.environ, PYTHONPATH=f'{tmp_path}:{shared_data.REPO_ROOT}')
  proc = subprocess.run(
      [sys.executable, '-c', 'import tff_rec.training'],
      cwd=shared_data.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
  )
  assert proc.returncode == 2
  assert 'tensorflow==2.14.1 expected, found 2.15.0' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_source_commit_names_the_checked_out_commit():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.isdir(os.path.join(root, '.git')):
    pytest.skip('not a git clone')
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                        check=True).stdout.strip()
  commit = version.source_commit()
  assert commit in (head, head + '+local-changes')


def test_machine_info():
  info = version.machine_info()
  assert info['cores'] >= 1 and info['python'] == sys.version.split()[0]
  assert 'cpu' in info and (info['ram_gb'] is None or info['ram_gb'] > 0)


def test_cpu_model_names_this_cpu():
  model = version.cpu_model()
  assert isinstance(model, str) and model
  assert version.machine_info()['cpu'] == model


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
