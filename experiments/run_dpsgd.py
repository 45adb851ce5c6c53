"""Central DP-SGD baseline on MovieLens (Bu et al. 2020 / TF Privacy tutorial).

Trains the tutorial's NCF-softmax model with DP-Adam on a random 80/20 split
and writes result.json and result.md under --output_dir:

  python -m experiments.run_dpsgd --data_dir=../shared/data/ml-1m.zip \
      --output_dir=runs/dpsgd/ml1m_nm0.55
  # non-private reference:
  python -m experiments.run_dpsgd --data_dir=../shared/data/ml-1m.zip \
      --noise_multiplier=0 --output_dir=runs/dpsgd/ml1m_nonprivate
  # user-level DP-SGD (a unit is a user with all of their ratings):
  python -m experiments.run_dpsgd --data_dir=../shared/data/ml-1m.zip \
      --unit=user --batch_size=75 --output_dir=runs/dpsgd/ml1m_user

See privacy/dpsgd.py for the sampling, the units and what ε means.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags
from absl import logging

from privacy import dpsgd
from tff_rec.data import errors
from tff_rec.data import sources
from tff_rec.data import splits

FLAGS = flags.FLAGS

flags.DEFINE_enum('dataset', 'ml-1m', ['ml-100k', 'ml-1m'], 'MovieLens release.')
_DATA_DIR = common_flags.define_data_dir_flag('Folder (or .zip) holding the MovieLens data.')
flags.DEFINE_float('test_fraction', 0.2, 'Random test fraction of the ratings.')
flags.DEFINE_integer('seed', 0, 'Seed for the split, initialization and sampling.')
flags.DEFINE_float('noise_multiplier', 0.55, 'Noise std / clip norm; 0: non-private.')
flags.DEFINE_float('l2_norm_clip', 5.0, 'Per-unit gradient clip norm.')
flags.DEFINE_float('learning_rate', 0.01, 'Adam learning rate.')
flags.DEFINE_integer('batch_size', 10000, 'Expected units (ratings or users) per step.')
flags.DEFINE_integer('epochs', 20, 'Epochs of floor(units / batch_size) steps.')
flags.DEFINE_float('delta', 1e-6, 'Target delta.')
flags.DEFINE_enum('unit', 'example', list(dpsgd.UNITS),
                  'Unit of privacy: one rating (the paper) or one user.')
flags.DEFINE_string('output_dir', 'runs/dpsgd', 'Where result.json/.md go.')


def config_from_flags() -> dpsgd.DpSgdConfig:
  """The run config; app.UsageError naming the flag for invalid values."""
  if not 0 < FLAGS.test_fraction < 1:
    raise app.UsageError(f'--test_fraction must be in (0, 1), got {FLAGS.test_fraction}')
  try:
    return dpsgd.DpSgdConfig(
        noise_multiplier=FLAGS.noise_multiplier,
        l2_norm_clip=FLAGS.l2_norm_clip,
        learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        delta=FLAGS.delta,
        unit=FLAGS.unit,
        seed=FLAGS.seed,
    )
  except ValueError as e:
    name = str(e).split(' ')[0]
    flag = {'l2_norm_clip': 'l2_norm_clip', 'noise_multiplier': 'noise_multiplier',
            'learning_rate': 'learning_rate', 'batch_size': 'batch_size', 'epochs': 'epochs',
            'delta': 'delta', 'unit': 'unit'}.get(name, name)
    raise app.UsageError(f'--{flag}: {e}') from e


def run(config: dpsgd.DpSgdConfig, dataset: str, data_dir: str, test_fraction: float,
        output_dir: str) -> dpsgd.DpSgdResult:
  """Loads and splits the data, trains, writes the result files."""
  try:
    ratings, info = sources.load_movielens(dataset, data_dir=data_dir)
    split = splits.split_random(ratings, fractions=(1.0 - test_fraction, 0.0, test_fraction),
                                seed=config.seed)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir: {e}') from e
  logging.info('%s', split.summary())

  def log_epoch(entry: dict) -> None:
    logging.info('epoch %d: test RMSE %.4f, eps rdp %.3f pld %.3f clt %s (%.1fs)',
                 entry['epoch'], entry.get('test_rmse', float('nan')), entry['epsilon_rdp'],
                 entry['epsilon_pld'], entry['epsilon_clt'], entry['seconds'])

  result = dpsgd.train(split.train, split.test, config, on_epoch=log_epoch)
  dpsgd.write_result(result, output_dir, extra={
      'data': {'dataset': dataset, 'source': info.path, 'checksum_verified': info.checksum_verified,
               'split': split.summary(), 'test_fraction': test_fraction},
  })
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = config_from_flags()
  result = run(config, FLAGS.dataset, _DATA_DIR.value, FLAGS.test_fraction, FLAGS.output_dir)
  p = result.privacy
  print(f'test RMSE {result.test_rmse:.4f}; epsilon rdp {p["epsilon_rdp"]:.3f}, '
        f'pld {p["epsilon_pld"]:.3f}, clt {p["epsilon_clt"]} at delta {config.delta:g} '
        f'({result.seconds:.0f}s); wrote {FLAGS.output_dir}/result.json')


if __name__ == '__main__':
  common_flags.run(main)
