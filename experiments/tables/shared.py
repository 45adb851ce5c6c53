"""What the table modules share: columns, optimizers, cell params, common splits."""

from __future__ import annotations

import functools
from typing import Any, Optional

from experiments.tables import common
from experiments.tables import harness
from tff_rec.data import splits as splits_lib
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import optimizers

Column = harness.Column
RowSpec = harness.RowSpec
Cell = harness.Cell
OURS, TRIVIAL, PUBLISHED = harness.OURS, harness.TRIVIAL, harness.PUBLISHED
SGD = functools.partial(optimizers.OptimizerConfig, 'sgd')
ADAM = functools.partial(optimizers.OptimizerConfig, 'adam')

RMSE = Column('rmse', 'RMSE', lower_is_better=True)
MAE = Column('mae', 'MAE', lower_is_better=True)
ACC = Column('rating_accuracy', 'rating acc.')
HR = Column('hr@10', 'HR@10')
ROUNDS = Column('rounds', 'rounds run', 0)
NDCG = Column('ndcg@10', 'NDCG@10')


def config_params(x: Any) -> Any:
  """A config for cell params (fields at their defaults left out; see harness.config_params)."""
  return harness.config_params(x)


def federated_params(base: dict, cfg: experiment.FederatedConfig, **extra: Any) -> dict:
  """A federated cell's params: its (result) config, with the round count kept top-level.

  `FederatedConfig` holds only what defines a result (how a run executes is
  `ExecutionConfig`, not part of a cell). `total_rounds` is a resumable key
  (left out of the run directory's hash), so a run capped by --max_rounds
  resumes into a longer one.
  """
  params = dict(base, config=config_params(cfg), **extra, total_rounds=cfg.total_rounds)
  params['config'].pop('total_rounds', None)
  return params


def by_user_split(ctx: harness.CellContext, max_users: Optional[int], seed: int,
                   val_fraction: float = 0.1) -> splits_lib.Split:
  fractions = (0.9 - val_fraction, val_fraction, 0.1)
  ratings, _ = common.movielens(ctx, common.ML1M)

  def make():
    r = data_setup.first_users(ratings, max_users) if max_users else ratings
    return splits_lib.split_by_user(r, fractions, seed=seed)

  return ctx.cached(('ml1m-by-user', max_users, seed, tuple(fractions)), make)


def final_eval_only(rounds: int, val_fraction: float) -> dict:
  """Config fields for one evaluation, on all test users after the last round."""
  # With validation users, periodic evaluation would use them: skip it.
  return dict(eval_every=rounds if not val_fraction else rounds + 1, eval_clients=None)

