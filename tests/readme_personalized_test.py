"""The README's personalized-recommendation table shows what results/personalized/*.json hold.

Each row names a method, data set, protocol and number of seeds; its numbers
must be the mean ± std (ddof 1) over `<method>_<data>_<protocol>_seed<k>.json`,
k < seeds, of the test metrics at each run's best validation round, rounded
as printed, and the best rounds must be those runs'.
"""

import json
import os
import re
import sys

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_REPO, 'results', 'personalized')
_METHODS = {'PFedRec': 'pfedrec', 'PFedRec, global ranking': 'pfedrec_global', 'FedMF': 'fedmf',
            'FedRAP': 'fedrap', 'PFedRec, global ranking, DP': 'pfedrec_global_dp'}
_DATA = {'ML-100K': 'ml100k', 'ML-1M': 'ml1m'}
_COLUMNS = ('test_hr', 'test_ndcg', 'test_full_hr', 'test_full_ndcg')


def _rows() -> list[list[str]]:
  with open(os.path.join(_REPO, 'README.md')) as f:
    text = f.read()
  start = text.index('## Personalized federated recommendation')
  section = text[start:text.index('\n## ', start + 1)]
  rows = []
  for line in section.splitlines():
    cells = [c.strip().strip('*') for c in line.strip().strip('|').split('|')]
    if line.startswith('|') and cells[0] in _METHODS:
      rows.append(cells)
  return rows


def test_the_table_is_found():
  assert len(_rows()) >= 6


@pytest.mark.parametrize('row', _rows(), ids=lambda r: ' '.join(r[:4]))
def test_row_matches_the_committed_runs(row):
  method, data, protocol, seeds, best_rounds = row[:5]
  runs = []
  for seed in range(int(seeds)):
    name = f'{_METHODS[method]}_{_DATA[data]}_{protocol}_seed{seed}.json'
    with open(os.path.join(_RESULTS, name)) as f:
      runs.append(json.load(f))
  assert [r['best_round'] for r in runs] == [int(x) for x in best_rounds.split(',')]
  for run in runs:
    assert run['best']['round'] == run['best_round']
    assert len(run['history']) == 100
    assert run['config']['loop']['protocol'] == protocol
  for column, cell in zip(_COLUMNS, row[5:9]):
    values = [r['best'][column] for r in runs]
    mean = f'{np.mean(values):.3f}'
    match = re.fullmatch(r'([\d.]+)(?: ± ([\d.]+))?', cell)
    assert match, cell
    assert match.group(1) == mean, (column, cell, values)
    if len(values) > 1:
      assert match.group(2) == f'{np.std(values, ddof=1):.3f}', (column, cell, values)
    else:
      assert match.group(2) is None


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
