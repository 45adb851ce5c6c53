"""Tables 6 and 7: personalized federated recommendation under the federated-NCF protocol.

`python -m experiments.reproduce --table=federated_ncf_ml100k` (and
`federated_ncf_ml1m`): PFedRec's protocol (`tff_rec.data.fedrec_protocol`),
leave-one-out by time, every user in every round, 100 rounds, the test score
of the round with the best validation HR@10, under the published negative
sampling (`as_published`) and without its leak (`leak_free`). Columns are
HR@10 / NDCG@10 against the 99 sampled negatives and against every item
outside the user's training set (full ranking).

Rows measured so far: popularity (trivial), PFedRec as published, PFedRec
ranking with the aggregated table (`ranking='global'`, ours), FedMF,
FedRecon, FedRAP (ML-100K only: its device state is a full item table per
user) and PFedRec with the global ranking under user-level DP. The central
GMF / MLP / NeuMF and FedNCF rows of issue 22 are not in these tables yet.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import numpy as np

from experiments.tables import common
from experiments.tables import harness
from experiments.tables import shared
from privacy import dp_aggregators
from privacy import federated_dp
from tff_rec import runtime
from tff_rec.data import fedrec_protocol
from tff_rec.data import readers
from tff_rec.training import data_setup
from tff_rec.training import fedmf
from tff_rec.training import fedrap
from tff_rec.training import fedrecon_ncf
from tff_rec.training import personalized
from tff_rec.training import personalized_loop
from tff_rec.training import pfedrec

AS_PUBLISHED = 'as_published (PFedRec code: training negatives never the held-out items)'
LEAK_FREE = 'leak_free (training negatives: anything outside the training set)'
SETTINGS = {'as_published': AS_PUBLISHED, 'leak_free': LEAK_FREE}

POPULARITY = 'Popularity (trivial)'
PFEDREC = 'PFedRec (ranks with its fine-tuned table)'
PFEDREC_GLOBAL = 'PFedRec, global ranking (ours)'
FEDMF = 'FedMF'
FEDRECON = 'FedRecon'
FEDRAP = 'FedRAP'
DP_EPSILON = 8.0
PFEDREC_GLOBAL_DP = f'PFedRec, global ranking, user-level DP (eps {DP_EPSILON:g})'

HR = shared.Column('hr@10', 'HR@10')
NDCG = shared.Column('ndcg@10', 'NDCG@10')
FULL_HR = shared.Column('full_hr@10', 'HR@10 full')
FULL_NDCG = shared.Column('full_ndcg@10', 'NDCG@10 full')
BEST_ROUND = shared.Column('best_round', 'best round (val)', 0)
EPSILON = shared.Column('epsilon', 'epsilon', 2)

ROUNDS = 100
QUICK_USERS = 120
QUICK_ROUNDS = 2
PUBLISHED_ML1M_PFEDREC = {'hr@10': 0.7326, 'ndcg@10': 0.4436}
PUBLISHED_SOURCE = 'Zhang et al., "Dual Personalization on Federated Recommendation", IJCAI 2023, Table 2'


@dataclasses.dataclass(frozen=True)
class _Method:
  label: str
  algorithm: str
  hparams: object
  dp: bool = False


def _methods(dataset: str) -> list[_Method]:
  out = [_Method(PFEDREC, 'pfedrec', pfedrec.PFedRecConfig()),
         _Method(PFEDREC_GLOBAL, 'pfedrec', pfedrec.PFedRecConfig(ranking='global')),
         _Method(FEDMF, 'fedmf', fedmf.FedMFConfig()),
         _Method(FEDRECON, 'fedrecon', fedrecon_ncf.FedReconConfig())]
  if dataset == common.ML100K:
    out.append(_Method(FEDRAP, 'fedrap', fedrap.FedRAPConfig()))
  out.append(_Method(PFEDREC_GLOBAL_DP, 'pfedrec', pfedrec.PFedRecConfig(ranking='global'),
                     dp=True))
  return out


def _dp_config() -> dp_aggregators.DpConfig:
  """Adaptive clipping (median of the update norms), noise calibrated to DP_EPSILON."""
  return dp_aggregators.DpConfig(mode='gaussian_adaptive', target_epsilon=DP_EPSILON)


def _data(ctx: harness.CellContext, dataset: str, seed: int,
          max_users: Optional[int]) -> fedrec_protocol.FedRecData:
  ratings, _ = common.movielens(ctx, dataset)

  def make():
    r = ratings
    if max_users:  # --quick: the first users, over the items they rated
      r = readers.compact_catalog(data_setup.first_users(ratings, max_users))
    return fedrec_protocol.fedrec_split(r, seed=seed)

  return ctx.cached(('fedrec-split', dataset, max_users, seed), make)


def popularity_metrics(data: fedrec_protocol.FedRecData, top_k: int = 10) -> dict:
  """Items scored by their number of training users; ties count against the held-out item.

  Args:
    data: The split.
    top_k: K of HR@K / NDCG@K.

  Returns:
    Test HR / NDCG against the sampled negatives and in full ranking.
  """
  counts = np.bincount(data.train_items, minlength=data.num_items).astype(np.float64)
  sums = dict.fromkeys(('hr', 'ndcg', 'full_hr', 'full_ndcg'), 0.0)
  for u in range(data.num_users):
    target = data.test_items[u]
    score = counts[target]
    candidates = np.ones(data.num_items, bool)
    candidates[data.train_items_of(u)] = False
    candidates[target] = False
    for prefix, rank in (('', int(np.sum(counts[data.test_negatives[u]] >= score))),
                         ('full_', int(np.sum(counts[candidates] >= score)))):
      if rank < top_k:
        sums[f'{prefix}hr'] += 1.0
        sums[f'{prefix}ndcg'] += 1.0 / np.log2(rank + 2.0)
  return {f'{k}@{top_k}': v / data.num_users for k, v in sums.items()}


def _popularity(dataset: str, seed: int, max_users: Optional[int],
                ctx: harness.CellContext) -> dict:
  return {POPULARITY: popularity_metrics(_data(ctx, dataset, seed, max_users))}


def _run_dir(ctx: harness.CellContext, rounds: int) -> str:
  """The cell's run directory, unless it holds more rounds (then a sibling)."""
  path = os.path.join(ctx.run_dir, 'history.json')
  if os.path.exists(path):
    with open(path) as f:
      if len(json.load(f)) > rounds:
        return f'{ctx.run_dir}-r{rounds}'
  return ctx.run_dir


def _personalized(method: _Method, dataset: str, protocol: str, seed: int, rounds: int,
                  max_users: Optional[int], ctx: harness.CellContext) -> dict:
  data = _data(ctx, dataset, seed, max_users)
  loop = personalized_loop.LoopConfig(rounds=rounds, protocol=protocol, seed=seed)
  dp = federated_dp.prepare_personalized_dp(
      _dp_config() if method.dp else dp_aggregators.DpConfig(), clients_per_round=None,
      population=data.num_users, total_rounds=rounds)
  runtime.ensure_context()
  result = personalized.train(
      method.algorithm, data, hparams=method.hparams, loop=loop, run_dir=_run_dir(ctx, rounds),
      model_aggregator=dp.aggregator,
      aggregator_description=dp.report() if dp.enabled else 'uniform mean',
      progress=ctx.options.progress_bar, round_metrics=dp.extra_metrics_fn)
  best = result.best
  metrics = {'hr@10': best['test_hr'], 'ndcg@10': best['test_ndcg'],
             'full_hr@10': best['test_full_hr'], 'full_ndcg@10': best['test_full_ndcg'],
             'best_round': result.best_round, 'rounds': rounds,
             'seconds_per_round': result.seconds_per_round}
  if dp.enabled:
    metrics.update(epsilon=dp.epsilon_after(rounds), delta=dp.delta,
                   noise_multiplier=dp.config.noise_multiplier)
  return {method.label: metrics}


def _table(dataset: str) -> harness.TableSpec:
  name = 'federated_ncf_' + dataset.replace('-', '')
  methods = _methods(dataset)
  rows = []
  for protocol, setting in SETTINGS.items():
    rows.append(shared.RowSpec(POPULARITY, setting, shared.TRIVIAL))
    for m in methods:
      published = {}
      if dataset == common.ML1M and protocol == 'as_published' and m.label == PFEDREC:
        published = PUBLISHED_ML1M_PFEDREC
      rows.append(shared.RowSpec(m.label, setting, published=published,
                                 source=PUBLISHED_SOURCE if published else '',
                                 beats_trivial_quick=False))

  def build(options: harness.RunOptions) -> list[shared.Cell]:
    max_users = QUICK_USERS if options.quick else None
    rounds = QUICK_ROUNDS if options.quick else common.capped_rounds(options, ROUNDS)
    cells = []
    for protocol, setting in SETTINGS.items():
      for seed in options.seeds:
        base = dict(dataset=dataset, protocol=protocol, seed=seed, max_users=max_users)
        cells.append(shared.Cell(f'{protocol}-popularity-s{seed}', (POPULARITY,), setting, seed,
                                 base, functools.partial(_popularity, dataset, seed, max_users)))
        for m in methods:
          params = dict(base, algorithm=m.algorithm, hparams=harness.config_params(m.hparams),
                        total_rounds=rounds)
          keys = ('total_rounds',)
          if m.dp:
            params['dp'] = harness.config_params(_dp_config())
            keys = ()  # the noise is calibrated to the number of rounds
          tag = m.label.split(' (')[0].replace(', ', '-').replace(' ', '_').lower()
          cells.append(shared.Cell(
              f'{protocol}-{tag}-s{seed}', (m.label,), setting, seed, params,
              functools.partial(_personalized, m, dataset, protocol, seed, rounds, max_users),
              resumable_keys=keys))
    return cells

  label = {common.ML100K: 'MovieLens-100K', common.ML1M: 'MovieLens-1M'}[dataset]
  notes = [
      'Protocol: PFedRec\'s code (github Zhangcx19/IJCAI-23-PFedRec, commit abc2380), '
      'see tff_rec/data/fedrec_protocol.py: leave-one-out by time, 99 sampled negatives each '
      'for the validation and test items, 4 fresh training negatives per positive per round, '
      'every user in every round, 100 rounds, reported: the test score of the round with the '
      'best validation HR@10. Full ranking: against every item outside the user\'s training '
      'set. Ties count against the held-out item.',
      'as_published draws training negatives from items the user never interacted with, so '
      'the held-out items are never training negatives while the evaluation negatives are; '
      'leak_free draws them from everything outside the training set.',
      'PFedRec, global ranking (ours): PFedRec\'s training, but each device ranks with the '
      'aggregated item table and its own score function instead of its fine-tuned copy. A '
      'local round changes only the rows of the round\'s examples, so the fine-tuned copy '
      'ranks unrated items as the global table does except that the round\'s sampled '
      'negatives are demoted (tff_rec/training/pfedrec.py, RANKINGS).',
      'FedMF: PFedRec\'s client recipe (rates, batch, loss) with one joint SGD step per batch '
      'and ranking with the aggregated table (tff_rec/training/fedmf.py).',
      'FedRecon: the same model and recipe; each round the device rebuilds its user vector from '
      f'the same initial value ({fedrecon_ncf.FedReconConfig().recon_epochs} passes of '
      'user-vector-only steps), then trains the item rows '
      'with it frozen, and rebuilds it against the aggregated table to rank '
      '(tff_rec/training/fedrecon_ncf.py).',
      f'DP: gaussian_adaptive (median clip), every user every round (sampling rate 1), noise '
      f'calibrated to epsilon {DP_EPSILON:g} at delta 1/population^1.1 over the rounds run (RDP '
      'accountant); the device state never leaves the device. Validation-based round '
      'selection and the reported metrics are not private.',
      'Not yet measured here: central GMF / MLP / NeuMF and FedNCF under this protocol '
      '(issue 22).',
  ]
  if dataset == common.ML1M:
    notes.append('FedRAP is left out on ML-1M: its device state is a full personal item '
                 'table per user (2.9 GB per round for 6,040 users), which wants per-client '
                 'shard files first.')
  return harness.TableSpec(
      name=name,
      title=f'Personalized federated recommendation on {label} (federated-NCF protocol)',
      description=(
          f'{label}, one client per user, PFedRec\'s protocol under its published negative '
          'sampling and without its leak; HR@10 / NDCG@10 of the test item against 99 sampled '
          'negatives and in full ranking, at the round with the best validation HR@10.'),
      columns=[HR, NDCG, FULL_HR, FULL_NDCG, BEST_ROUND, EPSILON],
      rows=rows,
      build_cells=build,
      check_metric='hr@10',
      notes=notes,
      plot=dict(kind='bars', metrics=['hr@10', 'full_hr@10'], settings=list(SETTINGS.values())),
  )


def federated_ncf_ml100k_table() -> harness.TableSpec:
  return _table(common.ML100K)


def federated_ncf_ml1m_table() -> harness.TableSpec:
  return _table(common.ML1M)
