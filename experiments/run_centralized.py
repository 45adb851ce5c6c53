"""Central (non-federated) Keras baselines on the same splits as run_federated.

  python -m experiments.run_centralized --flagfile=experiments/flags/ml100k_central_mf.cfg
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from experiments import common_flags
from tff_rec.data import errors
from tff_rec.training import central
from tff_rec.training import data_setup

FLAGS = flags.FLAGS

common_flags.define_data_flags()
common_flags.define_model_flags()
common_flags.define_output_flags('central')
common_flags.define_optimizer_flags('central', 'adam', 0.001)
flags.DEFINE_integer('epochs', 10, 'Training epochs.')
flags.DEFINE_integer('batch_size', 256, 'Batch size.')
flags.DEFINE_integer('negatives_per_positive', 4, 'Sampled negatives per rating (implicit models).')
flags.DEFINE_integer('top_k', 10, 'K of HR@K / NDCG@K (implicit models).')
flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')


def config_from_flags() -> central.CentralConfig:
  """Validates the flags (before any work) and builds the run config."""
  for name in ('epochs', 'batch_size', 'top_k'):
    common_flags._positive(name)  # pylint: disable=protected-access
  if FLAGS.negatives_per_positive < 0:
    raise app.UsageError(f'--negatives_per_positive must be >= 0, got {FLAGS.negatives_per_positive}')
  return central.CentralConfig(
      data=common_flags.data_config_from_flags(),
      model=common_flags.model_config_from_flags(),
      optimizer=common_flags.optimizer_from_flags('central'),
      epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size,
      negatives_per_positive=FLAGS.negatives_per_positive,
      top_k=FLAGS.top_k,
      root_output_dir=FLAGS.root_output_dir,
      experiment_name=FLAGS.experiment_name,
      seed=FLAGS.seed,
      progress_bar=FLAGS.progress_bar,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  common_flags.quiet_logging()
  config = config_from_flags()
  try:
    split = data_setup.load_split(config.data)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir: {e}') from e
  try:
    result = central.run_central(config, split=split)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  shown = ', '.join(f'{k}={v:.4f}' for k, v in result.test_metrics.items() if isinstance(v, float))
  print(f'{result.run_dir}: test {shown} ({result.seconds:.0f}s)')


if __name__ == '__main__':
  common_flags.run(main)
