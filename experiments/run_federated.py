"""Federated training of a recommender on MovieLens with TFF.

Trains with FedAvg, FedProx or Federated Reconstruction, one client per user,
checkpointing every K rounds (rerun the same command to resume), writing
metrics (CSV, TensorBoard), hparams.json, test_metrics.json and the final
model under --root_output_dir/--experiment_name.

  python -m experiments.run_federated --flagfile=experiments/flags/quickstart.cfg
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import common_flags
from experiments import dp_flags
from experiments import run_setup
from privacy import secure_rounds
from compression import comm
from tff_rec import runtime
from tff_rec.data import errors
from tff_rec.training import algorithms
from tff_rec.training import data_setup
from tff_rec.training import evaluation
from tff_rec.training import execution as execution_lib
from tff_rec.training import experiment
from tff_rec.training import sampling

FLAGS = flags.FLAGS

common_flags.define_data_flags()
common_flags.define_model_flags()
common_flags.define_output_flags('federated')
common_flags.define_optimizer_flags('client', 'sgd', 0.1)
common_flags.define_optimizer_flags('server', 'sgd', 1.0)
common_flags.define_optimizer_flags('reconstruction', 'sgd', 0.1)
dp_flags.define_dp_flags()
flags.DEFINE_enum('compression', 'none', list(comm.MODES),
                  'Client->server update compression: 8-bit quantization (quantize8) or Hadamard '
                  'rotation plus quantization (hadamard8) of tensors above --compression_threshold.')
flags.DEFINE_integer('compression_threshold', comm.DEFAULT_THRESHOLD,
                     'Quantize only tensors with more elements than this.')

flags.DEFINE_enum('algorithm', 'fedavg', list(algorithms.ALGORITHMS), 'Federated algorithm.')
flags.DEFINE_enum('weighting', 'num_examples', list(algorithms.WEIGHTINGS),
                  'Client weighting in aggregation (DP requires uniform).')
flags.DEFINE_float('proximal_strength', 0.01, 'FedProx mu.')
flags.DEFINE_integer('clients_per_round', 50, 'Clients (users) per round.')
flags.DEFINE_integer('total_rounds', 10, 'Training rounds.')
flags.DEFINE_integer('client_epochs', 1, 'Local epochs per round.')
flags.DEFINE_integer('batch_size', 32, 'Client batch size.')
flags.DEFINE_integer('max_examples_per_user', None, 'Keep each user\'s latest N ratings.')
flags.DEFINE_enum('sampling', 'fixed_size', list(sampling.SAMPLING_MODES), 'Client sampling per round.')
flags.DEFINE_integer('eval_every', 5, 'Evaluate on held-out users every K rounds.')
flags.DEFINE_integer('eval_clients', None, 'Users per periodic evaluation (default: all).')
flags.DEFINE_integer('checkpoint_every', 1, 'Save program state every K rounds.')
flags.DEFINE_integer('recon_epochs', 1, 'FedRecon: reconstruction epochs (training and eval).')
flags.DEFINE_integer('recon_steps_max', None, 'FedRecon: max reconstruction steps.')
flags.DEFINE_integer('post_recon_steps_max', None, 'FedRecon: max post-reconstruction steps.')
flags.DEFINE_bool('split_dataset', False, 'FedRecon training: even batches reconstruct, odd batches train.')
flags.DEFINE_bool('finetune_eval', False, 'FedAvg on unseen users: also report local fine-tuning.')
flags.DEFINE_bool('row_sparse_mean', True, 'Average embedding-table rows over the clients that '
                  'touched them (False: TFF\'s plain mean, as in the FedRecon paper). Off with DP.')
flags.DEFINE_bool('progress_bar', True, 'Show a progress bar.')
flags.DEFINE_list('workers', [], 'host:port of running TFF worker_binary processes (default: one local worker).')
flags.DEFINE_float('worker_timeout_sec', runtime.WORKER_TIMEOUT_SEC,
                   'With --workers: a worker that does not answer a liveness probe for this long '
                   'while the run waits on it is reported dead and the run stops (rerun to resume).')
flags.DEFINE_integer('worker_restarts', 2, 'Replace a crashed local worker this many times, resuming '
                     'from the last checkpoint, before failing (not with --workers).', lower_bound=0)
flags.DEFINE_integer('max_concurrent_computation_calls', -1, 'Local worker concurrency cap (-1: none).')
flags.DEFINE_integer('clients_per_subround', 500, 'Split larger rounds into merged subrounds of this many '
                     'clients (bounds worker memory; results are unchanged).')
flags.DEFINE_string('client_data_dir', None, 'Keep one file per user here, read worker-side (needed when '
                    '--workers run on other hosts: a path they all see).')
flags.DEFINE_enum('loop_implementation', 'iterator', list(algorithms.LOOP_IMPLEMENTATIONS),
                  'Client loop: TFF DATASET_ITERATOR (faster) or DATASET_REDUCE.')
flags.DEFINE_bool('allow_config_change', False, 'Resume a run directory even though it was trained '
                  'with different result-defining flags (the results then mix both; default: refuse, '
                  'naming each difference).')
flags.DEFINE_float('max_zeroed_client_share', 0.5, 'Stop the run (keeping the last good checkpoint) '
                   'when more than this share of a round\'s clients sent non-finite updates.')
flags.DEFINE_enum('reconstruction', 'gradient', list(algorithms.RECONSTRUCTIONS),
                  'FedRecon: rebuild the user-side variables by --recon_epochs of the reconstruction '
                  'optimizer (gradient) or exactly, as the ridge regression it is for biased MF and '
                  'rating GMF (closed_form; refused for other models). Training and evaluation.')
flags.DEFINE_enum('fedrecon_implementation', 'fast', list(algorithms.FEDRECON_IMPLEMENTATIONS),
                  "FedRecon builder: the toolkit's fast client loop, or TFF's build_fed_recon "
                  '(the slower reference; gradient reconstruction only).')


def config_from_flags() -> experiment.FederatedConfig:
  """Validates the flags (before any work) and builds the run config."""
  for name in ('clients_per_round', 'total_rounds', 'client_epochs', 'batch_size', 'eval_every',
               'checkpoint_every', 'recon_epochs'):
    common_flags._positive(name)  # pylint: disable=protected-access
  for name in ('max_examples_per_user', 'eval_clients', 'recon_steps_max', 'post_recon_steps_max',
               'clients_per_subround'):
    common_flags._positive(name, allow_none=True)  # pylint: disable=protected-access
  data = common_flags.data_config_from_flags()
  model = common_flags.model_config_from_flags()
  try:
    algorithm = algorithms.AlgorithmConfig(
        name=FLAGS.algorithm,
        weighting=FLAGS.weighting,
        client_optimizer=common_flags.optimizer_from_flags('client'),
        server_optimizer=common_flags.optimizer_from_flags('server'),
        reconstruction_optimizer=common_flags.optimizer_from_flags('reconstruction'),
        proximal_strength=FLAGS.proximal_strength,
        recon_epochs=FLAGS.recon_epochs,
        recon_steps_max=FLAGS.recon_steps_max,
        post_recon_steps_max=FLAGS.post_recon_steps_max,
        split_dataset=FLAGS.split_dataset,
        row_sparse_mean=FLAGS.row_sparse_mean,
        reconstruction=FLAGS.reconstruction,
    )
  except ValueError as e:
    raise app.UsageError(f'--algorithm/--weighting/--proximal_strength/--reconstruction: {e}') from e
  return experiment.FederatedConfig(
      data=data,
      model=model,
      algorithm=algorithm,
      clients_per_round=FLAGS.clients_per_round,
      total_rounds=FLAGS.total_rounds,
      client_epochs=FLAGS.client_epochs,
      batch_size=FLAGS.batch_size,
      max_examples_per_user=FLAGS.max_examples_per_user,
      sampling=FLAGS.sampling,
      eval_every=FLAGS.eval_every,
      eval_clients=FLAGS.eval_clients,
      recon_eval=evaluation.ReconEvalConfig(
          optimizer=algorithm.reconstruction_optimizer,
          recon_epochs=FLAGS.recon_epochs,
          recon_steps_max=FLAGS.recon_steps_max,
          post_recon_steps_max=FLAGS.post_recon_steps_max,
          reconstruction=FLAGS.reconstruction,
      ),
      finetune_eval=FLAGS.finetune_eval,
      seed=FLAGS.seed,
  )


def _execution_flag(message: str) -> str:
  """The flag an ExecutionConfig error is about (its field name starts the message)."""
  field = message.split()[0] if message else ''
  return {'worker_restarts': '--worker_restarts', 'clients_per_subround': '--clients_per_subround',
          'checkpoint_every': '--checkpoint_every',
          'max_zeroed_client_share': '--max_zeroed_client_share',
          'worker_timeout_sec': '--worker_timeout_sec'}.get(field, 'execution flags')


def execution_from_flags() -> execution_lib.ExecutionConfig:
  """The execution-only flags (they may change when a run is resumed)."""
  for address in FLAGS.workers:
    host, _, port = address.strip().rpartition(':')
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
      raise app.UsageError(f'--workers: {address!r} is not host:port (port 1-65535)')
  common_flags.check_output_dir(FLAGS.root_output_dir, FLAGS.experiment_name)
  if FLAGS.reconstruction == 'closed_form' and FLAGS.fedrecon_implementation == 'tff':
    raise app.UsageError("--reconstruction=closed_form: TFF's builder "
                         '(--fedrecon_implementation=tff) has gradient reconstruction only')
  try:
    return execution_lib.ExecutionConfig(
        root_output_dir=FLAGS.root_output_dir,
        experiment_name=FLAGS.experiment_name,
        checkpoint_every=FLAGS.checkpoint_every,
        progress_bar=FLAGS.progress_bar,
        worker_addresses=tuple(FLAGS.workers),
        max_concurrent_computation_calls=FLAGS.max_concurrent_computation_calls,
        worker_restarts=FLAGS.worker_restarts,
        clients_per_subround=FLAGS.clients_per_subround,
        client_data_dir=FLAGS.client_data_dir,
        loop_implementation=FLAGS.loop_implementation,
        fedrecon_implementation=FLAGS.fedrecon_implementation,
        allow_config_change=FLAGS.allow_config_change,
        max_zeroed_client_share=FLAGS.max_zeroed_client_share,
        worker_timeout_sec=FLAGS.worker_timeout_sec,
    )
  except ValueError as e:
    raise app.UsageError(f'{_execution_flag(str(e))}: {e}') from e


def prepare_run(config: experiment.FederatedConfig, execution: execution_lib.ExecutionConfig, split,
                dp_config, compression: str, compression_threshold: int,
                secure_aggregation=secure_rounds.SecureAggregationConfig()
                ) -> tuple[experiment.FederatedConfig, execution_lib.ExecutionConfig, dict]:
  """`run_setup.prepare_run` for the flags; UsageError naming the flag if refused."""
  try:
    prepared = run_setup.prepare_run(config, execution, split, dp_config=dp_config,
                                     compression=compression,
                                     compression_threshold=compression_threshold,
                                     secure_aggregation=secure_aggregation)
  except run_setup.RunSetupError as e:
    raise app.UsageError(str(e)) from e
  return prepared.config, prepared.execution, prepared.run_kwargs


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  common_flags.quiet_logging()
  config = config_from_flags()
  execution = execution_from_flags()
  dp_config = dp_flags.dp_config_from_flags()
  if FLAGS.compression_threshold < 0:
    raise app.UsageError(f'--compression_threshold must be >= 0, got {FLAGS.compression_threshold}')
  try:
    split = data_setup.load_split(config.data)
  except (errors.DataError, ValueError) as e:
    raise app.UsageError(f'--dataset/--data_dir: {e}') from e
  secure_aggregation = dp_flags.secure_aggregation_from_flags(dp_config, config.seed)
  config, execution, kwargs = prepare_run(config, execution, split, dp_config, FLAGS.compression,
                                          FLAGS.compression_threshold, secure_aggregation)
  result = experiment.run_federated(config, execution, **kwargs)
  logging.info('Test metrics: %s', result.test_metrics)
  print(experiment.summary_line(result))


if __name__ == '__main__':
  common_flags.run(main)
