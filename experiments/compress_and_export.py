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
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Optional, Sequence

from absl import app
from absl import flags

from experiments import common_flags
from absl import logging
import numpy as np

from compression import federated_finetune
from compression import pruning
from compression import quantization
from compression import report
from compression import rotation
from compression import tflite_export
from tff_rec import runtime
from tff_rec.data import splits as splits_lib
from tff_rec.export import serving
from tff_rec.training import artifacts
from tff_rec.training import data_setup

QUANTIZE = ('none', 'int8', 'float16', 'qat')
FINETUNE = ('central', 'federated')
TFLITE = ('none', 'dynamic', 'int8')

_RUN_DIR = flags.DEFINE_string('run_dir', None, 'Training run directory (with final_model/).')
_DATA_DIR = flags.DEFINE_string('run_data_dir', None, "Override the run's data location (fine-tuning, "
                                '--exclude_seen and the report need the training split).')
_EXPORT_BASE = flags.DEFINE_string('export_base', 'exports', 'TF Serving model base directory.')
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'Model name in TF Serving.')
_VERSION = flags.DEFINE_integer('version', 1, 'Positive integer version directory.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing version directory.')
_PRUNE_SPARSITY = flags.DEFINE_float('prune_sparsity', 0.0, 'Target sparsity in [0, 1); 0: no pruning.')
_PRUNE_SCHEDULE = flags.DEFINE_enum('prune_schedule', 'polynomial', list(pruning.SCHEDULES),
                                    'Pruning schedule.')
_PRUNE_BIASES = flags.DEFINE_bool('prune_biases', False, 'Also prune 1-wide (bias) tables.')
_PRUNE_BASIS = flags.DEFINE_enum(
    'prune_basis', 'auto', list(rotation.BASES),
    "Prune MF tables in their balanced SVD basis ('svd'; scores unchanged) or as trained "
    "('none'); 'auto': 'svd' for dot-product MF with both tables on the server.")
_FINETUNE_EPOCHS = flags.DEFINE_integer('finetune_epochs', 1,
                                        'Central fine-tuning epochs (pruning and QAT).')
_FINETUNE = flags.DEFINE_enum(
    'finetune', 'central', list(FINETUNE),
    'Pruning fine-tuning: central (TF-MOT schedule with Keras fit) or federated (one-shot '
    'pruning, then FedAvg/FedRecon rounds with the zeros fixed).')
_FED_ROUNDS = flags.DEFINE_integer('federated_rounds', 10, 'Federated fine-tuning rounds.')
_FED_CLIENTS = flags.DEFINE_integer('federated_clients_per_round', 50,
                                    'Federated fine-tuning clients per round.')
_FED_CLIENT_LR = flags.DEFINE_float('federated_client_learning_rate', 0.1,
                                    'Federated fine-tuning client SGD learning rate.')
_FED_BATCH = flags.DEFINE_integer('federated_batch_size', 16, 'Federated fine-tuning client batch size.')
_FINETUNE_L2 = flags.DEFINE_float('finetune_l2', None,
                                  'Row L2 of the tables while fine-tuning a pruned model (default: the model\'s).')
_FINETUNE_LR = flags.DEFINE_float('finetune_learning_rate', 1e-3, 'Adam learning rate of fine-tuning.')
_BATCH_SIZE = flags.DEFINE_integer('finetune_batch_size', 256, 'Fine-tuning batch size.')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', list(QUANTIZE),
                              'Stored weights: float32, int8 / float16 post-training, or QAT then int8.')
_TFLITE = flags.DEFINE_enum('tflite', 'none', list(TFLITE), 'Also write a TFLite artifact.')
_EXCLUDE_SEEN = flags.DEFINE_bool('exclude_seen', False, 'recommend skips training items.')
_UNKNOWN_USER = flags.DEFINE_enum('unknown_user', 'error', list(serving.UNKNOWN_POLICIES),
                                  'Unknown user ids: fail the request or cold-start fallback.')
_UNKNOWN_ITEM = flags.DEFINE_enum('unknown_item', 'error', list(serving.UNKNOWN_POLICIES),
                                  'Unknown item ids: fail the request or cold-start fallback.')
_RECON_L2 = flags.DEFINE_float('recon_l2', None, 'FedRecon ridge strength (default: model l2 or 0.1).')
_REPORT = flags.DEFINE_bool('report', True, 'Write the compression report (needs the test split).')
_LATENCY_REQUESTS = flags.DEFINE_integer('latency_requests', 200, 'Requests timed for p50/p99.')


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything `run` needs (the flags)."""

  run_dir: str
  export_base: str
  model_name: str
  version: int = 1
  overwrite: bool = False
  data_dir: Optional[str] = None
  prune_sparsity: float = 0.0
  prune_schedule: str = 'polynomial'
  prune_biases: bool = False
  prune_basis: str = 'auto'
  finetune_epochs: int = 1
  finetune_learning_rate: float = 1e-3
  finetune_l2: Optional[float] = None
  batch_size: int = 256
  finetune: str = 'central'
  federated: federated_finetune.FederatedFinetuneConfig = federated_finetune.FederatedFinetuneConfig()
  quantize: str = 'none'
  tflite: str = 'none'
  export: serving.ExportOptions = serving.ExportOptions()
  report: bool = True
  latency_requests: int = 200

  def __post_init__(self):
    if self.quantize not in QUANTIZE:
      raise ValueError(f'quantize must be one of {list(QUANTIZE)}, got {self.quantize!r}')
    if self.tflite not in TFLITE:
      raise ValueError(f'tflite must be one of {list(TFLITE)}, got {self.tflite!r}')
    if not 0.0 <= self.prune_sparsity < 1.0:
      raise ValueError(f'prune_sparsity must be in [0, 1), got {self.prune_sparsity}')
    if self.prune_sparsity and self.quantize == 'qat':
      raise ValueError('quantize=qat with pruning is not supported: QAT fine-tuning would regrow '
                       'the pruned weights; use quantize=int8 after pruning')
    if self.quantize == 'qat' and self.finetune_epochs <= 0:
      raise ValueError('quantize=qat needs finetune_epochs > 0')
    if self.finetune not in FINETUNE:
      raise ValueError(f'finetune must be one of {list(FINETUNE)}, got {self.finetune!r}')
    if self.finetune == 'federated' and not self.prune_sparsity:
      raise ValueError('finetune=federated fine-tunes a pruned model; set --prune_sparsity')
    if self.prune_sparsity:
      self.pruning_config()  # Validates the schedule / epochs combination.
    if self.latency_requests <= 0:
      raise ValueError('latency_requests must be positive')

  @property
  def needs_data(self) -> bool:
    return bool((self.prune_sparsity and (self.finetune_epochs or self.finetune == 'federated'))
                or self.quantize == 'qat' or self.export.exclude_seen or self.report)

  def pruning_config(self) -> pruning.PruningConfig:
    if self.finetune == 'federated':
      # One-shot magnitude pruning of the embedding tables (federated fine-tuning keeps
      # fixed masks on tables only; Dense kernels stay dense); the rounds fine-tune.
      return pruning.PruningConfig(target_sparsity=self.prune_sparsity, schedule='constant',
                                   finetune_epochs=0, prune_biases=self.prune_biases,
                                   prune_dense=False, basis=self.prune_basis)
    return pruning.PruningConfig(
        target_sparsity=self.prune_sparsity, schedule=self.prune_schedule,
        finetune_epochs=self.finetune_epochs, batch_size=self.batch_size,
        learning_rate=self.finetune_learning_rate, prune_biases=self.prune_biases,
        finetune_l2=self.finetune_l2, basis=self.prune_basis)

  @property
  def artifacts_dir(self) -> str:
    return os.path.join(self.export_base, self.model_name, 'artifacts', str(self.version))


@dataclasses.dataclass
class PipelineResult:
  export: serving.ExportResult
  tflite_path: Optional[str]
  report_paths: Optional[tuple[str, str]]
  rows: list
  sparsity: Optional[dict]


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


def config_from_flags() -> PipelineConfig:
  """The pipeline config; app.UsageError naming the flag for invalid values."""
  for flag in (_RUN_DIR, _MODEL_NAME):
    if not flag.value:
      raise app.UsageError(f'--{flag.name} is required')
  try:
    serving.check_version(_EXPORT_BASE.value, _MODEL_NAME.value, _VERSION.value, _OVERWRITE.value)
  except serving.ExportError as e:
    flag = '--model_name' if 'model name' in str(e) else '--version' if 'version must' in str(e) else '--overwrite'
    raise app.UsageError(f'{flag}: {e}') from e
  try:
    options = serving.ExportOptions(
        exclude_seen=_EXCLUDE_SEEN.value, unknown_user=_UNKNOWN_USER.value,
        unknown_item=_UNKNOWN_ITEM.value, recon_l2=_RECON_L2.value)
    return PipelineConfig(
        run_dir=_RUN_DIR.value, export_base=_EXPORT_BASE.value, model_name=_MODEL_NAME.value,
        version=_VERSION.value, overwrite=_OVERWRITE.value, data_dir=_DATA_DIR.value,
        prune_sparsity=_PRUNE_SPARSITY.value, prune_schedule=_PRUNE_SCHEDULE.value,
        prune_biases=_PRUNE_BIASES.value, prune_basis=_PRUNE_BASIS.value,
        finetune_epochs=_FINETUNE_EPOCHS.value,
        finetune_learning_rate=_FINETUNE_LR.value, finetune_l2=_FINETUNE_L2.value,
        batch_size=_BATCH_SIZE.value, finetune=_FINETUNE.value,
        federated=federated_finetune.FederatedFinetuneConfig(
            rounds=_FED_ROUNDS.value, clients_per_round=_FED_CLIENTS.value,
            client_learning_rate=_FED_CLIENT_LR.value, batch_size=_FED_BATCH.value),
        quantize=_QUANTIZE.value, tflite=_TFLITE.value, export=options, report=_REPORT.value,
        latency_requests=_LATENCY_REQUESTS.value)
  except ValueError as e:
    raise app.UsageError(f'{_flag_for(str(e))}: {e}') from e


def load_run_split(run_dir: str, data_dir: Optional[str] = None) -> splits_lib.Split:
  """The training run's split, rebuilt from its hparams.json data config."""
  path = os.path.join(run_dir, 'hparams.json')
  if not os.path.exists(path):
    raise artifacts.RunOutputError(f'{run_dir}: no hparams.json to rebuild the data split from')
  data = dict(artifacts.read_json(path)['config']['data'])
  if data_dir is not None:
    data['data_dir'] = data_dir
  return data_setup.load_split(data_setup.DataConfig(**data))


def _recon_l2(config: PipelineConfig, model_config) -> float:
  return (config.export.recon_l2 or float(model_config['hparams'].get('l2') or 0.0)
          or serving.DEFAULT_RECON_L2)


def _tflite(config: PipelineConfig, model, model_config, split) -> tuple[str, str]:
  """Writes the TFLite artifact; (path, parity note)."""
  rng = np.random.default_rng(0)
  local = model_config['user_embedding'] == 'local'
  if local:
    l2 = _recon_l2(config, model_config)
    hist = split.train.select(split.train.users == split.train.users[0]) if split else None
    h_items = hist.items if hist is not None else np.arange(min(5, model_config['num_items']))
    h_ratings = hist.ratings if hist is not None else np.full(len(h_items), 3.0)
    inputs = dict(history_item=h_items.astype(np.int32), history_rating=h_ratings.astype(np.float32),
                  item=np.arange(min(50, model_config['num_items']), dtype=np.int32))
    rep = lambda: iter([inputs])
    content = tflite_export.convert_recon(model, config.tflite, l2, rep)
    ref = tflite_export.recon_reference(model, l2)(**inputs)
  else:
    src = split.test if split is not None and split.test.num_ratings else None
    users = src.users if src is not None else rng.integers(0, model_config['num_users'], 256)
    items = src.items if src is not None else rng.integers(0, model_config['num_items'], 256)
    users, items = users[:2048].astype(np.int32), items[:2048].astype(np.int32)
    rep_src = split.train if split is not None else None
    rep = tflite_export.representative_pairs(
        rep_src.users if rep_src is not None else users, rep_src.items if rep_src is not None else items)
    content = tflite_export.convert(model, config.tflite, rep)
    inputs = {'user': users, 'item': items}
    ref = model(inputs, training=False).numpy()
  diff = tflite_export.verify(content, ref, inputs)
  path = tflite_export.write(os.path.join(config.artifacts_dir, 'model.tflite'), content)
  return path, f'max |tflite - float| = {diff:.3g} on {len(ref)} scores'


def run(config: PipelineConfig) -> PipelineResult:
  """Loads the run, compresses, exports, writes TFLite and the report."""
  try:
    rec, model_config, user_index, item_index = artifacts.load_final_model(config.run_dir)
    serving.check_supported(model_config)
  except (artifacts.RunOutputError, serving.ExportError) as e:
    raise app.UsageError(f'--run_dir: {e}') from e
  serving.check_version(config.export_base, config.model_name, config.version, config.overwrite)
  split = None
  if config.needs_data:
    try:
      split = load_run_split(config.run_dir, config.data_dir)
    except (ValueError, OSError) as e:
      raise app.UsageError(f'--run_data_dir: cannot rebuild the training split of {config.run_dir}: {e}') from e
  if config.finetune == 'federated' and config.prune_sparsity and split is not None:
    population = len(split.train.present_users())
    if config.federated.clients_per_round > population:
      raise app.UsageError(f'--federated_clients_per_round={config.federated.clients_per_round} '
                           f'exceeds the {population} training users of {config.run_dir}')
  task = model_config['task']
  model = rec.keras_model
  sparsity, basis = None, None
  if config.prune_sparsity:
    local = [layer.name for layer in rec.local_layers]
    try:
      rotation.resolve(config.prune_basis, model, exclude=local)
    except ValueError as e:
      raise app.UsageError(f'--prune_basis: {e}') from e
    result = pruning.prune(model, task, split.train if split else None, config.pruning_config(),
                           exclude=local)
    model, sparsity, basis = result.model, result.sparsity, result.basis
    logging.info('pruned %s in the %s basis: %s', result.pruned_layers, basis, sparsity)
    if config.finetune == 'federated':
      finetune_dir = os.path.join(config.artifacts_dir, 'federated_finetune')
      if config.overwrite and os.path.isdir(finetune_dir):
        shutil.rmtree(finetune_dir)  # the replaced version's fine-tuning
      runtime.ensure_context()
      tuned = federated_finetune.finetune(model, model_config, split.train, config.federated,
                                          finetune_dir)
      model, sparsity = tuned.model, tuned.sparsity
      logging.info('federated fine-tuning, last round: %s', tuned.metrics)
  storage = config.quantize
  if config.quantize == 'qat':
    model, losses = quantization.qat_finetune(model, task, split.train, quantization.QatConfig(
        epochs=config.finetune_epochs, batch_size=config.batch_size,
        learning_rate=config.finetune_learning_rate))
    logging.info('QAT losses %s', losses)
    storage = 'int8'
  seen = split.train if split is not None else None
  exported = serving.export(
      model, model_config, user_index, item_index, config.export_base, config.model_name,
      config.version, config.export, seen=seen, storage_fn=quantization.storage_fn(storage),
      overwrite=config.overwrite)
  tflite_path, tflite_note = None, ''
  if config.tflite != 'none':
    tflite_path, tflite_note = _tflite(config, model, model_config, split)
  report_paths, rows = None, []
  if config.report:
    rows = _report_rows(config, rec.keras_model, model, storage, model_config, user_index,
                        item_index, split, exported, tflite_path, tflite_note)
    report_paths = report.write_report(rows, config.artifacts_dir, extra={
        'run_dir': config.run_dir, 'model': model_config['model'],
        'user_embedding': model_config['user_embedding'], 'quantize': config.quantize,
        'prune_sparsity': config.prune_sparsity, 'prune_basis': basis, 'finetune': config.finetune,
        'sparsity_per_weight': sparsity})
  return PipelineResult(exported, tflite_path, report_paths, rows, sparsity)


def _report_rows(config, float_model, model, storage, model_config, user_index, item_index, split,
                 exported, tflite_path, tflite_note) -> list:
  """Baseline (float32 export in a temp dir) and compressed rows."""
  negatives = split.negatives
  rows = []
  tmp = tempfile.mkdtemp(prefix='tff_rec_baseline_')
  try:
    base_export = serving.export(float_model, model_config, user_index, item_index, tmp, 'baseline', 1,
                                 dataclasses.replace(config.export, warmup=False), seen=split.train)
    for name, exp, keras_model, stored in (
        ('float32', base_export, float_model, None),
        (_variant_name(config, storage), exported, model, storage)):
      raw, gz = report.disk_bytes(exp.version_dir)
      stored_model = serving.build_serving_model(
          keras_model, model_config, config.export, quantization.storage_fn(stored or 'none'))
      params, nonzeros = report.param_counts(stored_model)
      metrics = report.evaluate_export(exp.version_dir, model_config, user_index, item_index,
                                       split.train, split.test, negatives)
      p50, p99 = report.recommend_latency(exp.version_dir, model_config, user_index, item_index,
                                          split.train, requests=config.latency_requests)
      rows.append(report.ReportRow(name, exp.version_dir, raw, gz, params, nonzeros, metrics, p50, p99))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  rows[0].path = '(temporary float32 export)'
  if tflite_path:
    raw, gz = report.disk_bytes(tflite_path)
    rows.append(report.ReportRow(f'tflite-{config.tflite}', tflite_path, raw, gz, notes=tflite_note))
  return rows


def _variant_name(config: PipelineConfig, storage: str) -> str:
  parts = []
  if config.prune_sparsity:
    parts.append(f'pruned{config.prune_sparsity:g}' + ('-federated' if config.finetune == 'federated' else ''))
  parts.append('qat-int8' if config.quantize == 'qat' else storage if storage != 'none' else 'float32')
  return '+'.join(parts)


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
