"""The README's reproduced tables show what the committed results of its commands hold.

For each table section of the README ("Reproducing published tables"), every
`python -m experiments.reproduce ...` command it gives must match the command
recorded in the manifest of the folder that command writes, and every number in
the section's Markdown tables must be a value of those folders' table.csv
(means, stds, published numbers), rounded as printed.
"""

import sys
import csv
import json
import math
import os
import re
import shlex

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMMAND = re.compile(r'`python -m experiments\.reproduce ([^`]+)`')
# Decimal numbers with 2+ decimals and comma-grouped integers, not ratios like "2.0x".
_NUMBER = re.compile(r'(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+\.\d{2,})(?![\w.%])')


def _sections() -> dict[str, str]:
  with open(os.path.join(_REPO, 'README.md')) as f:
    text = f.read()
  start = text.index('## Reproducing published tables')
  end = text.find('\n## ', start + 1)
  part = text[start:end if end != -1 else len(text)]
  chunks = re.split(r'\n(?=### )', part)
  return {c.splitlines()[0]: c for c in chunks if c.startswith('### ')}


def _output_dir(args: list[str]) -> str:
  values = dict(a[2:].split('=', 1) for a in args if a.startswith('--') and '=' in a)
  if 'output_dir' in values:
    return values['output_dir']
  name = os.path.basename(values['flagfile'])
  assert name.startswith('table_') and name.endswith('.cfg'), name
  return os.path.join('results', name[len('table_'):-len('.cfg')])


def _csv_values(folder: str) -> list[float]:
  values = []
  with open(os.path.join(_REPO, folder, 'table.csv')) as f:
    for row in csv.DictReader(f):
      for v in row.values():
        try:
          x = float(v)
        except (TypeError, ValueError):
          continue
        if math.isfinite(x):
          values.append(x)
  return values


def _table_rows(section: str) -> list[str]:
  """Data rows of the section's Markdown tables (header and rule rows dropped)."""
  lines = section.splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.startswith('|') or line.startswith('|---'):
      continue
    if i + 1 < len(lines) and lines[i + 1].startswith('|---'):
      continue  # a header row
    rows.append(line)
  return rows


def _matches(token: str, values: list[float]) -> bool:
  if ',' in token:
    n = int(token.replace(',', ''))
    return any(round(v) == n for v in values)
  digits = len(token.split('.')[1])
  return any(f'{v:.{digits}f}' == token for v in values)


_SECTIONS = _sections()


def test_every_table_section_is_found():
  assert len(_SECTIONS) == 5, list(_SECTIONS)


@pytest.mark.parametrize('title', sorted(_SECTIONS))
def test_section_commands_and_numbers_match_committed_results(title):
  section = _SECTIONS[title]
  commands = _COMMAND.findall(section)
  assert commands, f'{title}: no reproduce command'
  values = []
  for command in commands:
    args = shlex.split(command)
    folder = _output_dir(args)
    manifest_path = os.path.join(_REPO, folder, 'manifest.json')
    assert os.path.exists(manifest_path), f'{title}: `{command}` has no committed {folder}/'
    with open(manifest_path) as f:
      recorded = json.load(f)['command']
    recorded_args = shlex.split(recorded.split(' -m experiments.reproduce', 1)[1])
    assert recorded_args == args, f'{title}: README runs {args}, {folder} was written by {recorded_args}'
    values += _csv_values(folder)
  rows = _table_rows(section)
  assert rows, f'{title}: no table'
  unmatched = [(row.split('|')[1].strip(), t) for row in rows
               for t in _NUMBER.findall('|'.join(row.split('|')[2:]))  # not the row label
               if not _matches(t, values)]
  assert not unmatched, f'{title}: numbers not in the results of its commands: {unmatched}'


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
