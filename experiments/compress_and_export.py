"""Compresses a trained model and exports it for TF Serving (plus TFLite and a report).

  python -m experiments.compress_and_export --run_dir=runs/central_mf \
      --export_base=exports --model_name=mf --version=1 \
      --prune_sparsity=0.8 --finetune_epochs=2 --quantize=int8 --tflite=dynamic \
      --exclude_seen --unknown_user=cold_start

  # One-shot magnitude pruning, then federated fine-tuning with the zeros fixed
  # (FedAvg, or FedRecon for runs with on-device user rows):
  python -m experiments.compress_and_export --run_dir=runs/fedrecon_mf \
      --export_base=exports --model_name=mf --prune_sparsity=0.8 \
      --finetune=federated --federated_rounds=20 --federated_clients_per_round=50

Writes `<export_base>/<model_name>/<version>/` (SavedModel with warmup
requests), updates `<export_base>/models.config`, and puts the TFLite file
and `compression_report.{csv,md}` (float32 baseline vs the compressed export:
bytes, gzip bytes, parameters, nonzeros, test RMSE/MAE, recommend p50/p99)
in `<export_base>/<model_name>/artifacts/<version>/` (a non-numeric
directory, which TF Serving ignores). Fine-tuning, `--exclude_seen` and the
report reload the run's training split from its hparams.json (`--data_dir`
(`--run_data_dir`) overrides where the data set is read from).

This binary parses flags into a `compression.pipeline.PipelineConfig` and
calls `compression.pipeline.run`, which does the work.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from compression import federated_finetune
from compression import pipeline
from compression import pruning
from compression import rotation
from experiments import common_flags
from tff_rec.export import serving

FLAGS = flags.FLAGS

flags.DEFINE_string('run_dir', None, 'Training run directory (with final_model/).')
flags.DEFINE_string('run_data_dir', None, "Override the run's data location (fine-tuning, "
                    '--exclude_seen and the report need the training split).')
flags.DEFINE_string('export_base', 'exports', 'TF Serving model base directory.')
flags.DEFINE_string('model_name', None, 'Model name in TF Serving.')
flags.DEFINE_integer('version', 1, 'Positive integer version directory.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing version directory.')
flags.DEFINE_float('prune_sparsity', 0.0, 'Target sparsity in [0, 1); 0: no pruning.')
flags.DEFINE_enum('prune_schedule', 'polynomial', list(pruning.SCHEDULES),
                  'Pruning schedule.')
flags.DEFINE_bool('prune_biases', False, 'Also prune 1-wide (bias) tables.')
flags.DEFINE_enum(
    'prune_basis', 'auto', list(rotation.BASES),
    "Prune MF tables in their balanced SVD basis ('svd'; scores unchanged) or as trained "
    "('none'); 'auto': 'svd' for dot-product MF with both tables on the server.")
flags.DEFINE_integer('finetune_epochs', 1,
                     'Central fine-tuning epochs (pruning and QAT).')
flags.DEFINE_enum(
    'finetune', 'central', list(pipeline.FINETUNE),
    'Pruning fine-tuning: central (TF-MOT schedule with Keras fit) or federated (one-shot '
    'pruning, then FedAvg/FedRecon rounds with the zeros fixed).')
flags.DEFINE_integer('federated_rounds', 10, 'Federated fine-tuning rounds.')
flags.DEFINE_integer('federated_clients_per_round', 50,
                     'Federated fine-tuning clients per round.')
flags.DEFINE_float('federated_client_learning_rate', 0.1,
                   'Federated fine-tuning client SGD learning rate.')
flags.DEFINE_integer('federated_batch_size', 16, 'Federated fine-tuning client batch size.')
flags.DEFINE_float('finetune_l2', None,
                   'Row L2 of the tables while fine-tuning a pruned model (default: the model\'s).')
flags.DEFINE_float('finetune_learning_rate', 1e-3, 'Adam learning rate of fine-tuning.')
flags.DEFINE_integer('finetune_batch_size', 256, 'Fine-tuning batch size.')
flags.DEFINE_enum('quantize', 'none', list(pipeline.QUANTIZE),
                  'Stored weights: float32, int8 / float16 post-training, or QAT then int8.')
flags.DEFINE_enum('tflite', 'none', list(pipeline.TFLITE), 'Also write a TFLite artifact.')
flags.DEFINE_bool('exclude_seen', False, 'recommend skips training items.')
flags.DEFINE_enum('unknown_user', 'error', list(serving.UNKNOWN_POLICIES),
                  'Unknown user ids: fail the request or cold-start fallback.')
flags.DEFINE_enum('unknown_item', 'error', list(serving.UNKNOWN_POLICIES),
                  'Unknown item ids: fail the request or cold-start fallback.')
flags.DEFINE_float('recon_l2', None, 'FedRecon ridge strength (default: model l2 or 0.1).')
flags.DEFINE_bool('report', True, 'Write the compression report (needs the test split).')
flags.DEFINE_integer('latency_requests', 200, 'Requests timed for p50/p99.')


_FLAG_OF = {'quantize': 'quantize', 'tflite': 'tflite', 'prune_sparsity': 'prune_sparsity',
            'target_sparsity': 'prune_sparsity', 'the polynomial': 'prune_schedule',
            'latency_requests': 'latency_requests', 'recon_l2': 'recon_l2',
            'unknown_user': 'unknown_user', 'unknown_item': 'unknown_item',
            'warmup_k': 'warmup_k', 'batch_size': 'finetune_batch_size',
            'finetune_l2': 'finetune_l2', 'finetune': 'finetune', 'rounds': 'federated_rounds',
            'clients_per_round': 'federated_clients_per_round',
            'learning rates': 'federated_client_learning_rate', 'basis': 'prune_basis'}


def _flag_for(message: str) -> str:
  for key, flag in _FLAG_OF.items():
    if message.startswith(key):
      return f'--{flag}'
  if 'qat' in message:
    return '--quantize'
  return '--finetune_epochs/--finetune_batch_size/--finetune_learning_rate'


def config_from_flags() -> pipeline.PipelineConfig:
  """The pipeline config; app.UsageError naming the flag for invalid values."""
  for flag in (FLAGS['run_dir'], FLAGS['model_name']):
    if not flag.value:
      raise app.UsageError(f'--{flag.name} is required')
  try:
    serving.check_version(FLAGS.export_base, FLAGS.model_name, FLAGS.version, FLAGS.overwrite)
  except serving.ExportError as e:
    flag = '--model_name' if 'model name' in str(e) else '--version' if 'version must' in str(e) else '--overwrite'
    raise app.UsageError(f'{flag}: {e}') from e
  try:
    options = serving.ExportOptions(
        exclude_seen=FLAGS.exclude_seen, unknown_user=FLAGS.unknown_user,
        unknown_item=FLAGS.unknown_item, recon_l2=FLAGS.recon_l2)
    return pipeline.PipelineConfig(
        run_dir=FLAGS.run_dir, export_base=FLAGS.export_base, model_name=FLAGS.model_name,
        version=FLAGS.version, overwrite=FLAGS.overwrite, data_dir=FLAGS.run_data_dir,
        prune_sparsity=FLAGS.prune_sparsity, prune_schedule=FLAGS.prune_schedule,
        prune_biases=FLAGS.prune_biases, prune_basis=FLAGS.prune_basis,
        finetune_epochs=FLAGS.finetune_epochs,
        finetune_learning_rate=FLAGS.finetune_learning_rate, finetune_l2=FLAGS.finetune_l2,
        batch_size=FLAGS.finetune_batch_size, finetune=FLAGS.finetune,
        federated=federated_finetune.FederatedFinetuneConfig(
            rounds=FLAGS.federated_rounds, clients_per_round=FLAGS.federated_clients_per_round,
            client_learning_rate=FLAGS.federated_client_learning_rate, batch_size=FLAGS.federated_batch_size),
        quantize=FLAGS.quantize, tflite=FLAGS.tflite, export=options, report=FLAGS.report,
        latency_requests=FLAGS.latency_requests)
  except ValueError as e:
    raise app.UsageError(f'{_flag_for(str(e))}: {e}') from e


def run(config: pipeline.PipelineConfig) -> pipeline.PipelineResult:
  """`pipeline.run`, its refusals as usage errors naming the flag."""
  try:
    return pipeline.run(config)
  except pipeline.PipelineError as e:
    raise app.UsageError(str(e)) from e


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = config_from_flags()
  result = run(config)
  print(f'exported {result.export.version_dir} ({", ".join(result.export.signatures)}); '
        f'models.config: {result.export.models_config}')
  if result.tflite_path:
    print(f'tflite: {result.tflite_path}')
  if result.report_paths:
    print(f'report: {result.report_paths[1]}')


if __name__ == '__main__':
  common_flags.run(main)
