"""Central training of biased MF on TensorFlow's parameter-server engine.

Embedding tables are split over the parameter servers (`ShardedVariable`s,
TF's own gRPC servers); workers run the training steps; this process is the
chief. After training: exact test RMSE, the unsharded final model (for
`compress_and_export`), and top-k items for every user written by the
workers, one CSV file per user shard.

  # A loopback cluster on this machine (chief here, 2 workers, 2 ps as processes):
  python -m experiments.run_central_distributed --dataset=ml-1m --data_dir=../shared/data \
      --cluster=loopback
  # The same training in one process (the reference):
  python -m experiments.run_central_distributed --dataset=ml-1m --data_dir=../shared/data \
      --cluster=none
  # A real cluster: on each worker/ps host `python -m experiments.start_ps_task` with its
  # TF_CONFIG; here, TF_CONFIG with task {"type": "chief", "index": 0}:
  python -m experiments.run_central_distributed --cluster=tf_config ...
  # A 2,000,000-item synthetic catalog:
  python -m experiments.run_central_distributed --synthetic_items=2000000 --cluster=loopback
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import common_flags
from tff_rec.data import errors
from tff_rec.distributed import cluster as cluster_lib
from tff_rec.distributed import experiment
from tff_rec.distributed import ps_training

FLAGS = flags.FLAGS

common_flags.define_data_flags()
common_flags.define_output_flags('central_distributed')
flags.DEFINE_integer('embedding_dim', 32, 'Latent factors of the biased MF.')
flags.DEFINE_float('l2', 0.05, 'L2 on looked-up embedding rows.')
flags.DEFINE_float('init_stddev', 0.1, 'Stddev of the embedding initializer.')
flags.DEFINE_integer('epochs', 10, 'Training epochs.')
flags.DEFINE_integer('batch_size', 1024, 'Examples per training step.')
flags.DEFINE_enum('optimizer', 'adagrad', list(ps_training.OPTIMIZERS),
                  "Optimizer (Keras 2.14's Adam would update whole tables on sparse gradients).")
flags.DEFINE_float('learning_rate', 0.1, 'Learning rate.')
flags.DEFINE_enum('cluster', 'loopback', list(experiment.CLUSTERS),
                  'none: one process; loopback: start a chief/worker/ps cluster on this machine; '
                  'tf_config: be the chief of the cluster in $TF_CONFIG.')
flags.DEFINE_integer('num_workers', 2, 'Loopback cluster: worker processes.')
flags.DEFINE_integer('num_ps', 2, 'Loopback cluster: parameter-server processes.')
flags.DEFINE_integer('min_shard_bytes', 256 << 10, 'Split variables into shards of at least this '
                     'size, at most one per ps.')
flags.DEFINE_integer('top_k', 10, 'Top-k items per user written after training (0: none).')
flags.DEFINE_integer('top_k_shards', 4, 'User shards (files) of the top-k output.')
flags.DEFINE_bool('verify_top_k', False, 'Also score every user in this process and compare.')
flags.DEFINE_integer('synthetic_items', None, 'Train on a synthetic catalog of this many items '
                     'instead of --dataset.')
flags.DEFINE_integer('synthetic_users', 10_000, 'Users of the synthetic catalog.')
flags.DEFINE_integer('synthetic_ratings_per_user', 50, 'Ratings per user of the synthetic catalog.')
flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')


def config_from_flags() -> experiment.DistributedConfig:
  """Validates the flags (before any work) and builds the run config."""
  for name in ('embedding_dim', 'epochs', 'batch_size', 'num_workers', 'num_ps', 'min_shard_bytes',
               'top_k_shards', 'synthetic_users', 'synthetic_ratings_per_user'):
    common_flags._positive(name)  # pylint: disable=protected-access
  common_flags._positive('synthetic_items', allow_none=True)  # pylint: disable=protected-access
  if FLAGS.top_k < 0:
    raise app.UsageError(f'--top_k must be >= 0, got {FLAGS.top_k}')
  if FLAGS.l2 < 0:
    raise app.UsageError(f'--l2 must be >= 0, got {FLAGS.l2}')
  synthetic = None
  if FLAGS.synthetic_items is not None:
    if FLAGS.synthetic_ratings_per_user > FLAGS.synthetic_items:
      raise app.UsageError('--synthetic_ratings_per_user must not exceed --synthetic_items')
    synthetic = experiment.SyntheticCatalog(FLAGS.synthetic_users, FLAGS.synthetic_items,
                                            FLAGS.synthetic_ratings_per_user)
  try:
    train = ps_training.PsTrainConfig(
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate, seed=FLAGS.seed, min_shard_bytes=FLAGS.min_shard_bytes,
        progress_bar=FLAGS.progress_bar)
  except ValueError as e:
    raise app.UsageError(f'--optimizer/--learning_rate: {e}') from e
  if FLAGS.cluster == 'tf_config':
    try:
      cluster_lib.read_tf_config()
    except cluster_lib.ClusterError as e:
      raise app.UsageError(f'--cluster=tf_config: {e}') from e
  return experiment.DistributedConfig(
      data=common_flags.data_config_from_flags(),
      synthetic=synthetic,
      model_hparams={'embedding_dim': FLAGS.embedding_dim, 'l2': FLAGS.l2,
                     'init_stddev': FLAGS.init_stddev},
      train=train,
      cluster=FLAGS.cluster,
      num_workers=FLAGS.num_workers,
      num_ps=FLAGS.num_ps,
      top_k=FLAGS.top_k,
      top_k_shards=FLAGS.top_k_shards,
      verify_top_k=FLAGS.verify_top_k,
      root_output_dir=FLAGS.root_output_dir,
      experiment_name=FLAGS.experiment_name,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  common_flags.quiet_logging()
  config = config_from_flags()
  try:
    split = experiment.load_split(config)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir/--synthetic_*: {e}') from e
  result = experiment.run(config, split)
  logging.info('cluster: %s', result.cluster_report)
  shown = ', '.join(f'{k}={v:.4f}' for k, v in result.test_metrics.items() if isinstance(v, float))
  print(f'{result.run_dir}: test {shown} ({result.seconds:.0f}s)')


if __name__ == '__main__':
  common_flags.run(main)
