"""Seconds per full-participation PFedRec round: ours (TFF) against the reference PyTorch code.

A round is what PFedRec's train.py does per round: draw every user's fresh
training negatives, train every client, and evaluate val and test. Ours is
`personalized.train('pfedrec', ...)` with the reference's hyperparameters,
timed per round by `personalized_loop` (sampling, TFF round with on-device
evaluation, device-state and checkpoint writes). The first round is a
warm-up (TFF traces and compiles the computation) and is reported apart.

The reference (github Zhangcx19/IJCAI-23-PFedRec) runs, unmodified but on
CPU, through `pfedrec_reference_driver.py` when two environment variables
point at it:

  TFF_REC_PFEDREC_REFERENCE_PYTHON  an interpreter with torch, pandas, tensorboardX
  TFF_REC_PFEDREC_REFERENCE_REPO    a checkout of the reference repository

Without them the reference rows say why they were not run. The two are
timed one after the other on the same machine, never concurrently;
`ratio` is ours / reference (below 1: ours is faster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from benchmarks import common
from tff_rec.data import fedrec_protocol
from tff_rec.data import sources
from tff_rec.data import synthetic

NAME = 'pfedrec_speed'
REFERENCE_PYTHON_ENV = 'TFF_REC_PFEDREC_REFERENCE_PYTHON'
REFERENCE_REPO_ENV = 'TFF_REC_PFEDREC_REFERENCE_REPO'
_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pfedrec_reference_driver.py')


def _ours(data, rounds: int, smoke: bool) -> dict:
  from tff_rec import runtime  # pylint: disable=g-import-not-at-top
  from tff_rec.training import personalized  # pylint: disable=g-import-not-at-top
  from tff_rec.training import personalized_loop  # pylint: disable=g-import-not-at-top
  from tff_rec.training import pfedrec  # pylint: disable=g-import-not-at-top

  runtime.ensure_context()
  hparams = pfedrec.PFedRecConfig(embedding_dim=8, lr_eta=10.0, batch_size=16) if smoke else (
      pfedrec.PFedRecConfig())
  with tempfile.TemporaryDirectory() as run_dir:
    result = personalized.train('pfedrec', data, hparams=hparams, progress=False, run_dir=run_dir,
                                loop=personalized_loop.LoopConfig(rounds=rounds))
  times = [h['seconds'] for h in result.history]
  return dict(implementation='tff_rec (TFF 0.87)', clients=data.num_users,
              first_round_s=times[0], round_s=float(np.median(times[1:])),
              timed_rounds=len(times) - 1, last_test_hr=result.history[-1]['test_hr'])


def _reference(dataset: Optional[str], rounds: int) -> dict:
  python = os.environ.get(REFERENCE_PYTHON_ENV)
  repo = os.environ.get(REFERENCE_REPO_ENV)
  row = dict(implementation='reference PyTorch (CPU)')
  if dataset is None:
    return dict(row, not_run='no reference data set for the smoke scenario')
  if not python or not repo:
    return dict(row, not_run=f'set {REFERENCE_PYTHON_ENV} and {REFERENCE_REPO_ENV} to run it')
  proc = subprocess.run([python, _DRIVER, f'--repo={repo}', f'--dataset={dataset}',
                         f'--rounds={rounds}'], capture_output=True, text=True)
  if proc.returncode != 0:
    return dict(row, not_run=f'the reference failed: {proc.stderr.strip()[-500:]}')
  lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{')]
  times = [x['round_seconds'] for x in lines]
  return dict(row, clients=None, first_round_s=times[0], round_s=float(np.median(times[1:])),
              timed_rounds=len(times) - 1, last_test_hr=lines[-1]['test_hr'],
              train_s=float(np.median([x['train_seconds'] for x in lines[1:]])),
              torch=lines[-1]['torch'], torch_threads=lines[-1]['threads'])


def run(out_dir: str, smoke: bool = False, data_dir: Optional[str] = None,
        only_scenarios=()) -> str:
  """Times both implementations per scenario (all, or `only_scenarios` of
  ml-100k, ml-1m); writes pfedrec_speed.{json,md}."""
  started = time.time()
  if smoke:
    scenarios = [('synthetic', None, 3)]
  else:
    scenarios = [('ml-100k', 'ml-100k', 4), ('ml-1m', 'ml-1m', 2)]
    if only_scenarios:
      unknown = set(only_scenarios) - {s[0] for s in scenarios}
      if unknown:
        raise ValueError(f'unknown pfedrec_speed scenarios {sorted(unknown)}; valid: ml-100k, ml-1m')
      scenarios = [s for s in scenarios if s[0] in only_scenarios]
  rows = []
  for name, dataset, rounds in scenarios:
    if dataset is None:
      ratings = synthetic.clustered_interactions(num_users=60, num_items=120, per_user=20)
      data = fedrec_protocol.fedrec_split(ratings, num_eval_negatives=20)
    else:
      ratings, _ = sources.load_movielens(dataset, data_dir=data_dir)
      data = fedrec_protocol.fedrec_split(ratings)
    ours = dict(_ours(data, rounds, smoke), scenario=name)
    ref = dict(_reference(dataset, rounds), scenario=name, clients=data.num_users)
    if ref.get('round_s'):
      ours['ratio'] = ours['round_s'] / ref['round_s']
    rows += [ours, ref]
  parameters = dict(smoke=smoke, scenarios=[s[0] for s in scenarios],
                    rounds={s[0]: s[2] for s in scenarios},
                    hparams='PFedRec train.py defaults (dim 32, batch 256, lr 0.1, lr_eta 80, '
                            '4 negatives, 1 local epoch), every client every round',
                    timing='median of the rounds after the first (warm-up) round, one after the '
                           'other on the same machine')
  md = '\n'.join([
      '# PFedRec seconds per full-participation round: ours (TFF) vs the reference PyTorch code',
      '', common.machine_line(), '',
      common.markdown_table(rows, ['scenario', 'implementation', 'clients', 'first_round_s',
                                   'round_s', 'train_s', 'timed_rounds', 'ratio', 'not_run']),
      ''])
  return common.write_result(out_dir, NAME, parameters, {'rows': rows}, md, started)


if __name__ == '__main__':
  print(run(sys.argv[1] if len(sys.argv) > 1 else os.path.join('runs', 'benchmarks'),
            data_dir=sys.argv[2] if len(sys.argv) > 2 else None))
