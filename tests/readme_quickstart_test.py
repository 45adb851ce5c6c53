"""The README's path from the quickstart to a served model works as written.

Runs the shell block under "From the quickstart to a served model" in the
README, line by line as a user would, in a fresh copy of the repository (the
tracked files, with this checkout's .venv): `make run`, the export of the
FedRecon model, and a query of its `recommend_from_history` signature with
TF's `saved_model_cli`, which needs nothing from the toolkit.
"""

import sys
import os
import re
import shutil
import subprocess

import pytest

from tests import shared_data

_MARKER = '<!-- quickstart-to-serving'


def readme_block() -> str:
  """The shell block after the quickstart-to-serving marker."""
  with open(os.path.join(shared_data.REPO_ROOT, 'README.md')) as f:
    text = f.read()
  start = text.index(_MARKER)
  match = re.search(r'```sh\n(.*?)```', text[start:], re.S)
  assert match, 'no ```sh block after the quickstart-to-serving marker'
  return match.group(1)


def test_the_block_is_the_documented_path():
  block = readme_block()
  assert block.splitlines()[0] == 'make run'
  assert 'compress_and_export --run_dir=runs/quickstart ' in block
  assert 'recommend_from_history' in block


def _fresh_copy(dest: str) -> None:
  files = subprocess.run(['git', 'ls-files', '-z'], cwd=shared_data.REPO_ROOT, check=True,
                         capture_output=True).stdout.decode().split('\0')
  for rel in files:
    if not rel or rel.startswith('results/'):
      continue
    os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
    shutil.copy2(os.path.join(shared_data.REPO_ROOT, rel), os.path.join(dest, rel))
  os.symlink(os.path.join(shared_data.REPO_ROOT, '.venv'), os.path.join(dest, '.venv'))


@pytest.mark.slow
def test_readme_quickstart_to_serving_runs_as_written(tmp_path):
  repo = str(tmp_path / 'repo')
  _fresh_copy(repo)
  script = tmp_path / 'readme.sh'
  script.write_text('set -euo pipefail\n' + readme_block())
  proc = subprocess.run(['bash', str(script)], cwd=repo, capture_output=True, text=True,
                        timeout=1800, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert os.path.isdir(os.path.join(repo, 'runs', 'quickstart', 'final_model'))
  assert os.path.isfile(os.path.join(repo, 'exports', 'quickstart', '1', 'saved_model.pb'))
  # saved_model_cli printed the top-5 items and scores of the request.
  assert "Result for output key item_ids" in proc.stdout
  assert "Result for output key scores" in proc.stdout


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
