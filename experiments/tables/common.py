"""Building blocks shared by the table definitions: data, runs, trivial baselines."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow_federated as tff

from tff_rec.data import federated
from tff_rec.data import ncf
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import sources
from tff_rec.data import splits as splits_lib
from experiments import run_setup
from experiments.tables import harness
from tff_rec.models import predictions
from tff_rec.training import central
from tff_rec.training import execution as execution_lib
from tff_rec.training import experiment
from tff_rec.training import loop
from tff_rec.training import model_fns

ML100K = 'ml-100k'
ML1M = 'ml-1m'
NCF_ML1M = 'ncf-ml-1m'
DATA_FILES = {ML100K: 'ml-100k.zip', ML1M: 'ml-1m.zip', NCF_ML1M: 'ncf-ml-1m.zip'}


def data_location(options: harness.RunOptions, name: str) -> Optional[str]:
  """Where data set `name` is read from: its own path, else --data_dir, else None.

  None means the sources' default (cache, then download) for MovieLens; the
  NCF split has no download and needs a path.
  """
  if name in options.data_paths and options.data_paths[name]:
    return options.data_paths[name]
  if options.data_dir:
    zipped = os.path.join(options.data_dir, DATA_FILES[name])
    return zipped if os.path.exists(zipped) else options.data_dir
  if name == NCF_ML1M:
    raise ValueError('the NCF leave-one-out split (ncf-ml-1m.zip) has no download; pass '
                     '--data_dir (a folder holding ncf-ml-1m.zip) or --ncf_ml_1m=<path>')
  return None


def movielens(ctx: harness.CellContext, name: str) -> tuple[ratings_lib.Ratings, sources.SourceInfo]:
  """The ratings of a MovieLens release (loaded once per process)."""
  path = data_location(ctx.options, name)
  return ctx.cached(('movielens', name, path), lambda: sources.load_movielens(name, data_dir=path))


def data_sources(cache: Mapping) -> list[dict]:
  """Where the data sets loaded by a table run came from (for the manifest)."""
  out = []
  for key, value in cache.items():
    if key[0] == 'movielens':
      info = value[1]
      out.append({'dataset': key[1], 'origin': info.origin, 'path': info.path,
                  'checksum': info.checksum, 'checksum_verified': info.checksum_verified,
                  'num_ratings': int(value[0].num_ratings)})
    elif key[0] == 'ncf' and len(key) == 2:
      out.append({'dataset': NCF_ML1M, 'path': key[1], 'train_ratings': int(value.train.num_ratings),
                  'test_ratings': int(value.test.num_ratings)})
  return out


def ncf_split(ctx: harness.CellContext, max_users: Optional[int] = None) -> splits_lib.Split:
  """The NCF paper's leave-one-out split of ML-1M (optionally its first users)."""
  path = data_location(ctx.options, NCF_ML1M)
  split = ctx.cached(('ncf', path), lambda: ncf.read_ncf(path))
  if max_users is None:
    return split
  return ctx.cached(('ncf', path, max_users), lambda: first_users_split(split, max_users))


def first_users_split(split: splits_lib.Split, n: int) -> splits_lib.Split:
  """The split restricted to users 0..n-1 (same catalog; negatives kept aligned)."""
  keep_test = split.test.users < n
  negatives = split.negatives[keep_test] if split.negatives is not None else None
  return dataclasses.replace(
      split,
      train=split.train.select(split.train.users < n),
      val=split.val.select(split.val.users < n),
      test=split.test.select(keep_test),
      negatives=negatives,
      info={**dict(split.info), 'first_users': n})


def kfold_split(ratings: ratings_lib.Ratings, k: int, fold: int, seed: int) -> splits_lib.Split:
  """Fold `fold` (1-based) of k-fold cross-validation over random ratings.

  The ratings are permuted by `seed` and dealt into k folds of (nearly)
  equal size, as Surprise's `KFold(shuffle=True)`: fold f is the test part,
  the other k-1 folds train.
  """
  if not 1 <= fold <= k:
    raise ValueError(f'fold must be in 1..{k}, got {fold}')
  perm = np.random.default_rng(seed).permutation(ratings.num_ratings)
  part = np.empty(ratings.num_ratings, np.int64)
  part[perm] = np.arange(ratings.num_ratings) % k
  test = part == fold - 1
  empty = ratings.select(np.zeros(0, np.int64), name=f'{ratings.name}/val')
  return splits_lib.Split(ratings.select(~test, name=f'{ratings.name}/train'), empty,
                          ratings.select(test, name=f'{ratings.name}/test'), 'kfold', False,
                          seed=seed, info={'k': k, 'fold': fold})


def global_mean_metrics(train: ratings_lib.Ratings, test: ratings_lib.Ratings) -> dict:
  """The trivial rating predictor: the training mean for every test rating."""
  pred = np.full(test.num_ratings, train.global_mean(), np.float64)
  return predictions.rating_metrics(pred, test.ratings)


def popularity_metrics(split: splits_lib.Split, top_k: int = 10) -> dict:
  """The trivial ranking: items scored by their number of training ratings."""
  from tff_rec.models import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  counts = np.bincount(split.train.items, minlength=split.train.num_items).astype(np.float64)
  result = metrics_lib.hit_rate_and_ndcg_sampled(
      lambda u, i: counts[i], split.test.users, split.test.items, split.negatives, top_k)
  return {f'hr@{top_k}': result['hit_rate'], f'ndcg@{top_k}': result['ndcg'],
          'num_users': int(split.test.num_ratings)}


def capped_rounds(options: harness.RunOptions, rounds: int) -> int:
  """`rounds`, capped by --max_rounds."""
  if options.max_rounds:
    return min(rounds, int(options.max_rounds))
  return rounds


def capped_epochs(options: harness.RunOptions, epochs: int) -> int:
  """`epochs`, capped by --max_epochs."""
  if options.max_epochs:
    return min(epochs, int(options.max_epochs))
  return epochs


def federated_run_dir(ctx: harness.CellContext, rounds: int) -> str:
  """The cell's run directory, unless it holds a checkpoint past `rounds`.

  A run capped at R rounds resumes from the checkpoint of a shorter run with
  the same settings; a longer run's checkpoint is never reused for fewer
  rounds (it would report the longer run), a sibling directory is used.
  """
  latest = loop.latest_checkpoint_round(ctx.run_dir) if os.path.isdir(ctx.run_dir) else None
  if latest is not None and latest > rounds:
    return f'{ctx.run_dir}-r{rounds}'
  return ctx.run_dir


def run_federated(ctx: harness.CellContext, config: experiment.FederatedConfig,
                  split: splits_lib.Split, *, checkpoint_every: int = 1,
                  **setup) -> tuple[experiment.RunResult, run_setup.PreparedRun]:
  """A federated cell, assembled as the federated binary does, in its resumable directory.

  Args:
    ctx: The cell.
    config: The run's result configuration.
    split: Its split.
    checkpoint_every: Rounds between checkpoints.
    **setup: DP and compression choices of `run_setup.prepare_run`
      (`dp_config`, `compression`, ...); none by default.

  Returns:
    (result, prepared): the run's result, and the assembly it ran (its
    adjusted config, DP set-up and byte counts).
  """
  run_dir = federated_run_dir(ctx, config.total_rounds)
  execution = execution_lib.ExecutionConfig(
      root_output_dir=os.path.dirname(run_dir), experiment_name=os.path.basename(run_dir),
      progress_bar=ctx.options.progress_bar, checkpoint_every=checkpoint_every)
  prepared = run_setup.prepare_run(config, execution, split, **setup)
  return experiment.run_federated(prepared.config, prepared.execution,
                                  **prepared.run_kwargs), prepared


def run_central(ctx: harness.CellContext, config: central.CentralConfig,
                split: splits_lib.Split) -> central.CentralResult:
  """`central.run_central` writing into the cell's run directory."""
  config = dataclasses.replace(
      config, root_output_dir=os.path.dirname(ctx.run_dir),
      experiment_name=os.path.basename(ctx.run_dir), progress_bar=ctx.options.progress_bar)
  return central.run_central(config, split=split)


def seen_users_view(split: splits_lib.Split) -> splits_lib.Split:
  """The train part as a split `run_central` accepts (test = train, no held-out users).

  For central models trained on the training users of a by-user split and
  evaluated elsewhere (e.g. with reconstruction on held-out users).
  """
  empty = split.train.select(np.zeros(0, np.int64), name=f'{split.train.name}/empty')
  return splits_lib.Split(split.train, empty, split.train, split.kind, False, seed=split.seed,
                          info=dict(split.info))


def global_weights(spec: model_fns.ModelSpec, source) -> tff.learning.models.ModelWeights:
  """TFF weights of the FedRecon (local-user) model, global layers taken from `source`."""
  rec = spec.build(model_fns.UserEmbedding.LOCAL)
  for layer in rec.global_layers:
    layer.set_weights(source.get_layer(layer.name).get_weights())
  return tff.learning.models.ModelWeights(
      trainable=[v.numpy() for v in rec.global_variables if v.trainable],
      non_trainable=[v.numpy() for v in rec.global_variables if not v.trainable])


def pick(metrics: Mapping[str, Any], prefix: str = '', keys=('rmse', 'mae', 'rating_accuracy')) -> dict:
  """The float metrics `prefix + key` of a result, renamed to `key`."""
  return {k: float(metrics[prefix + k]) for k in keys if prefix + k in metrics}


def capped_test(split: splits_lib.Split, max_examples: Optional[int]) -> ratings_lib.Ratings:
  """Held-out users' ratings as their evaluation datasets hold them (latest N)."""
  return federated.cap_latest(split.test, max_examples)
