"""The README's sequential-recommendation table shows what results/sequential/*.json hold.

Each row names its results file; the test metrics printed must be those of
the run's best validation evaluation, rounded as printed, and the best
epoch (or round) must be the run's.
"""

import sys
import json
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_REPO, 'results', 'sequential')
_COLUMNS = ('hr@10', 'ndcg@10', 'full_hr@10', 'full_ndcg@10')


def _rows() -> list[list[str]]:
  with open(os.path.join(_REPO, 'README.md')) as f:
    text = f.read()
  start = text.index('## Sequential recommendation')
  section = text[start:text.index('\n## ', start + 1)]
  rows = []
  for line in section.splitlines():
    cells = [c.strip().strip('`') for c in line.strip().strip('|').split('|')]
    if line.startswith('|') and cells[-1].endswith('.json'):
      rows.append(cells)
  return rows


def test_the_table_is_found():
  assert len(_rows()) >= 3


@pytest.mark.parametrize('row', _rows(), ids=lambda r: r[-1])
def test_row_matches_the_committed_run(row):
  with open(os.path.join(_RESULTS, row[-1])) as f:
    run = json.load(f)
  result = run['result']
  best = result.get('best_epoch', result.get('best_round'))
  assert row[3] == str(best)
  metrics = result['test']
  if row[2].startswith('cold'):
    metrics = result['test_cold']
  elif row[2].startswith('warm'):
    metrics = result['test_warm']
  for column, cell in zip(_COLUMNS, row[4:8]):
    assert cell == f'{metrics[column]:.3f}', (column, cell, metrics[column])
  key = 'epoch' if 'best_epoch' in result else 'round'
  [at_best] = [h for h in run['history'] if h[key] == best]
  assert at_best['valid/hr@10'] == max(h['valid/hr@10'] for h in run['history'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
