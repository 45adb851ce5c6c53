"""The compression pipeline: a trained run in, a compressed TF Serving export out.

`run(config)` loads a training run's final model, optionally prunes it
(TF-MOT, central or federated fine-tuning with fixed masks), quantizes it
(int8 / float16 storage or QAT), exports a versioned SavedModel with
warmup requests (`tff_rec.export.serving`), writes a TFLite artifact, and a
report comparing a float32 export with the compressed one (bytes, gzip
bytes, parameters, nonzeros, test RMSE/MAE of the served predictions,
recommend p50/p99). `experiments/compress_and_export.py` is its binary: it
parses flags into a `PipelineConfig` and turns `PipelineError` into a usage
error. The library lives here, above `tff_rec`, because it combines
compression with the export path.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Optional

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


class PipelineError(ValueError):
  """A pipeline that must not run; the message starts with the flag it is about."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything `run` needs (the compress_and_export flags, one field each)."""

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


def load_run_split(run_dir: str, data_dir: Optional[str] = None) -> splits_lib.Split:
  """The training run's split, rebuilt from its hparams.json data config.

  Args:
    run_dir: The training run directory.
    data_dir: Where to read the data set instead of the recorded location.

  Returns:
    The split the run trained on.

  Raises:
    artifacts.RunOutputError: The run has no hparams.json.
  """
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
  """Loads the run, compresses, exports, writes TFLite and the report.

  Args:
    config: What to load, how to compress, where to export.

  Returns:
    The export, the TFLite path and report paths (None when not asked for),
    the report rows and the per-weight sparsity (None without pruning).

  Raises:
    PipelineError: Naming the flag: no usable training run, no training
      split to rebuild, too many federated clients, a pruning basis that does
      not apply. Checked before anything is written.
    serving.ExportError: The version exists and `overwrite` is off.
  """
  try:
    rec, model_config, user_index, item_index = artifacts.load_final_model(config.run_dir)
    serving.check_supported(model_config)
  except (artifacts.RunOutputError, serving.ExportError) as e:
    raise PipelineError(f'--run_dir: {e}') from e
  serving.check_version(config.export_base, config.model_name, config.version, config.overwrite)
  split = None
  if config.needs_data:
    try:
      split = load_run_split(config.run_dir, config.data_dir)
    except (ValueError, OSError) as e:
      raise PipelineError(f'--run_data_dir: cannot rebuild the training split of {config.run_dir}: {e}') from e
  if config.finetune == 'federated' and config.prune_sparsity and split is not None:
    population = len(split.train.present_users())
    if config.federated.clients_per_round > population:
      raise PipelineError(f'--federated_clients_per_round={config.federated.clients_per_round} '
                           f'exceeds the {population} training users of {config.run_dir}')
  task = model_config['task']
  model = rec.keras_model
  sparsity, basis = None, None
  if config.prune_sparsity:
    local = [layer.name for layer in rec.local_layers]
    try:
      rotation.resolve(config.prune_basis, model, exclude=local)
    except ValueError as e:
      raise PipelineError(f'--prune_basis: {e}') from e
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


