"""Compression benchmark on MovieLens-1M biased MF: size, accuracy and latency.

  python -m benchmarks.compression_benchmark --compression_data=../shared/data/ml-1m.zip

Flags carry a `compression_` prefix so this module can be imported next to
the experiment binaries (absl flags are global).

Trains a central biased MF (random 90/10 split), then measures through the
exported SavedModels (TF Serving layout, `tff_rec.export.serving`):

* int8 storage vs float32: export size (raw bytes of the version directory
  and of `variables/` only) and test RMSE change (targets: >= 3.5x smaller,
  RMSE +0.005 at most), for the main model and for MF models of the other
  `--compression_size_dims` (the graph is a fixed cost, so the
  whole-directory ratio grows with the embedding size);
* magnitude pruning at each of `--compression_prune_sparsities` (in the
  balanced SVD basis of the MF tables, `compression.rotation`; central
  fine-tuning): gzip size of the export vs float32 and RMSE change; the
  targets (>= 3x, +0.01 at most) are read at `--compression_prune_sparsity`.
  At that sparsity also: the same pruning in the trained basis, one-shot
  pruning followed by `--compression_federated_rounds` rounds of federated
  fine-tuning (FedAvg, `compression.federated_finetune`), pruning + int8,
  and pruning of the MF models of the other sizes;
* `recommend` top-10 over all items for one user per request, from the
  loaded SavedModel in this process on one core (intra- and inter-op
  parallelism 1, set before any op runs, so training runs on one thread
  too): p50 / p99 latency (target p50 <= 2 ms), float32 and int8, with and
  without `exclude_seen`.

Targets are reported, not asserted. Writes `compression_benchmark.json` (with
machine info and versions) and `compression_benchmark.md` to --output_dir.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from compression import federated_finetune
from compression import pruning
from compression import quantization
from compression import report
from compression import rotation
from tff_rec import atomic
from tff_rec import runtime
from tff_rec import version
from tff_rec.data import sources
from tff_rec.data import splits
from tff_rec.export import serving
from tff_rec.models import predictions as predictions_lib
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import optimizers

FLAGS = flags.FLAGS

flags.DEFINE_string(
    'compression_data', os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                 'shared', 'data', 'ml-1m.zip'),
    'The MovieLens zip (or its directory).')
flags.DEFINE_enum('compression_dataset', 'ml-1m', ['ml-1m', 'ml-100k'],
                  'Which MovieLens --compression_data holds (ml-100k: smoke runs).')
flags.DEFINE_string('compression_output_dir', 'runs/benchmarks/compression',
                    'Where the JSON and Markdown results go.')
flags.DEFINE_integer('compression_epochs', 8, 'Central MF training epochs.')
flags.DEFINE_integer('compression_embedding_dim', 64, 'MF factors.')
flags.DEFINE_list(
    'compression_size_dims', ['32', '128'],
    'Further MF sizes measured for int8 and for pruning at --compression_prune_sparsity '
    '(empty: none).')
flags.DEFINE_float('compression_l2', 0.04, 'MF row L2.')
flags.DEFINE_float('compression_learning_rate', 0.002, 'Adam learning rate.')
flags.DEFINE_integer('compression_batch_size', 1024, 'Training batch size.')
flags.DEFINE_float('compression_prune_sparsity', 0.8,
                   'The sparsity the pruning targets are read at.')
flags.DEFINE_list('compression_prune_sparsities', ['0.5', '0.6', '0.7', '0.8'],
                  'Sparsities measured (the target one is added).')
flags.DEFINE_integer('compression_finetune_epochs', 3, 'Pruning fine-tuning epochs.')
flags.DEFINE_enum('compression_prune_schedule', 'constant', list(pruning.SCHEDULES),
                  'TF-MOT sparsity schedule of the fine-tuned pruning rows.')
flags.DEFINE_enum('compression_prune_basis', 'auto', list(rotation.BASES),
                  'Basis the MF tables are pruned in (compression.rotation).')
flags.DEFINE_float('compression_finetune_l2', None,
                   "Row L2 while fine-tuning the pruned model (default: the model's).")
flags.DEFINE_integer('compression_federated_rounds', 20,
                     'Federated fine-tuning rounds after one-shot pruning (0: skip).')
flags.DEFINE_integer('compression_federated_clients', 100,
                     'Federated fine-tuning clients per round.')
flags.DEFINE_integer('compression_latency_requests', 1000, 'Timed recommend requests.')
flags.DEFINE_integer('compression_seed', 0, 'Split and initialization seed.')

TARGETS = {
    'int8_size_ratio_min': 3.5,
    'int8_rmse_delta_max': 0.005,
    'prune_gzip_ratio_min': 3.0,
    'prune_rmse_delta_max': 0.01,
    'recommend_p50_ms_max': 2.0,
}


def _single_core() -> None:
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def machine_info() -> dict:
  """Platform, CPU and package versions."""
  versions = dict(version.installed_versions())
  for name in ('tensorflow-serving-api', 'numpy'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {'platform': platform.platform(), 'python': sys.version.split()[0], 'cpu': version.cpu_model(),
          'cpu_count': os.cpu_count(), 'versions': versions,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to train and measure (the flags)."""

  data_dir: str
  dataset: str = 'ml-1m'
  epochs: int = 8
  embedding_dim: int = 64
  size_dims: tuple = (32, 128)
  l2: float = 0.04
  learning_rate: float = 0.002
  batch_size: int = 1024
  prune_sparsity: float = 0.8
  prune_sparsities: tuple = (0.5, 0.6, 0.7, 0.8)
  finetune_epochs: int = 3
  finetune_l2: Optional[float] = None
  prune_schedule: str = 'constant'
  prune_basis: str = 'auto'
  federated_rounds: int = 20
  federated_clients: int = 100
  requests: int = 1000
  seed: int = 0

  def __post_init__(self):
    if self.prune_schedule not in pruning.SCHEDULES:
      raise ValueError(f'prune_schedule must be one of {list(pruning.SCHEDULES)}, '
                       f'got {self.prune_schedule!r}')
    if self.prune_basis not in rotation.BASES:
      raise ValueError(f'prune_basis must be one of {list(rotation.BASES)}, got {self.prune_basis!r}')
    for name in ('epochs', 'embedding_dim', 'batch_size', 'finetune_epochs', 'requests',
                 'federated_clients'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.federated_rounds < 0:
      raise ValueError(f'federated_rounds must be >= 0, got {self.federated_rounds}')
    if any(d <= 0 for d in self.size_dims):
      raise ValueError(f'size_dims must be positive, got {self.size_dims}')
    for sparsity in (self.prune_sparsity,) + tuple(self.prune_sparsities):
      if not 0 < sparsity < 1:
        raise ValueError(f'prune_sparsity values must be in (0, 1), got {sparsity}')

  @property
  def sparsities(self) -> list:
    return sorted(set(self.prune_sparsities) | {self.prune_sparsity})

  def pruning_config(self, sparsity: float, basis: Optional[str] = None) -> pruning.PruningConfig:
    return pruning.PruningConfig(
        sparsity, self.prune_schedule, finetune_epochs=self.finetune_epochs,
        batch_size=self.batch_size, learning_rate=self.learning_rate,
        finetune_l2=self.finetune_l2, seed=self.seed, basis=basis or self.prune_basis)


def _train(config: BenchmarkConfig, split, dim: int, work: str):
  """A central biased MF of `dim` factors; (model, model_config, user_index, item_index, rmse)."""
  central_config = central.CentralConfig(
      data=data_setup.DataConfig(dataset=config.dataset, data_dir=config.data_dir, test_fraction=0.1,
                                 seed=config.seed),
      model=experiment.ModelConfig('mf', {'embedding_dim': dim, 'l2': config.l2}),
      optimizer=optimizers.OptimizerConfig('adam', config.learning_rate), epochs=config.epochs,
      batch_size=config.batch_size, root_output_dir=work, experiment_name=f'mf{dim}',
      seed=config.seed, progress_bar=False)
  trained = central.run_central(central_config, split=split)
  rec, model_config, user_index, item_index = artifacts.load_final_model(trained.run_dir)
  return rec.keras_model, model_config, user_index, item_index, trained.test_metrics['rmse']


class _Measure:
  """Exports a model variant and measures size, accuracy and latency through the SavedModel."""

  def __init__(self, config: BenchmarkConfig, split, export_base: str):
    self._config, self._split, self._base = config, split, export_base
    self._version = 0

  def __call__(self, keras_model, model_config, user_index, item_index, storage, options,
               reference: Optional[np.ndarray] = None) -> tuple[dict, np.ndarray]:
    self._version += 1
    split = self._split
    exported = serving.export(keras_model, model_config, user_index, item_index, self._base,
                              'mf', self._version, options, seen=split.train,
                              storage_fn=quantization.storage_fn(storage or 'none'))
    raw, gz = report.disk_bytes(exported.version_dir)
    var_raw, var_gz = report.disk_bytes(os.path.join(exported.version_dir, 'variables'))
    predictions = report.predict_export(exported.version_dir, model_config, user_index,
                                        item_index, split.train, split.test)
    # Served predictions (clipped by the export; tff_rec/models/predictions.py).
    metrics = predictions_lib.rating_metrics(predictions, split.test.ratings)
    reference = predictions if reference is None else reference
    p50, p99 = report.recommend_latency(exported.version_dir, model_config, user_index,
                                        item_index, split.train, k=10,
                                        requests=self._config.requests, warmup=50,
                                        seed=self._config.seed)
    row = {'raw_bytes': raw, 'gzip_bytes': gz, 'variables_raw_bytes': var_raw,
           'variables_gzip_bytes': var_gz, 'rmse': metrics['rmse'],
           'mae': metrics['mae'],
           'max_abs_diff_vs_float32': float(np.max(np.abs(predictions - reference))),
           'recommend_p50_ms': p50, 'recommend_p99_ms': p99}
    return row, predictions


def run(config: BenchmarkConfig) -> dict:
  """Trains, compresses, exports and measures; returns the results."""
  _single_core()
  started = time.time()
  ratings, info = sources.load_movielens(config.dataset, data_dir=config.data_dir,
                                         allow_download=False)
  split = splits.split_random(ratings, fractions=(0.9, 0.0, 0.1), seed=config.seed)
  work = tempfile.mkdtemp(prefix='compression_benchmark_')
  seconds = {}
  try:
    t = time.time()
    model, model_config, user_index, item_index, central_rmse = _train(
        config, split, config.embedding_dim, work)
    seconds['train'] = time.time() - t
    measure = _Measure(config, split, os.path.join(work, 'exports'))
    ids = (model_config, user_index, item_index)
    plain = serving.ExportOptions(warmup=False)
    seen = serving.ExportOptions(exclude_seen=True, warmup=False)
    results = {}
    results['float32'], reference = measure(model, *ids, None, plain)
    for storage in ('int8', 'float16'):
      results[storage], _ = measure(model, *ids, storage, plain, reference)

    t = time.time()
    sparsity_of = {}
    target = f'pruned{config.prune_sparsity:g}'
    basis = None
    for sparsity in config.sparsities:
      pruned = pruning.prune(model, 'rating', split.train, config.pruning_config(sparsity))
      basis = pruned.basis
      name = f'pruned{sparsity:g}'
      results[name], _ = measure(pruned.model, *ids, None, plain, reference)
      sparsity_of[name] = pruned.sparsity
      if name == target:
        results[f'{name}+int8'], _ = measure(pruned.model, *ids, 'int8', plain, reference)
    if basis == 'svd':  # the same pruning in the trained basis, for comparison
      pruned = pruning.prune(model, 'rating', split.train,
                             config.pruning_config(config.prune_sparsity, 'none'))
      results[f'{target}-trained-basis'], _ = measure(pruned.model, *ids, None, plain, reference)
    seconds['prune_central'] = time.time() - t

    if config.federated_rounds:
      t = time.time()
      one_shot = pruning.prune(model, 'rating', None, pruning.PruningConfig(
          config.prune_sparsity, 'constant', 0, basis=config.prune_basis))
      results[f'{target}-one-shot'], _ = measure(one_shot.model, *ids, None, plain, reference)
      runtime.ensure_context()
      tuned = federated_finetune.finetune(
          one_shot.model, model_config, split.train, federated_finetune.FederatedFinetuneConfig(
              rounds=config.federated_rounds, clients_per_round=config.federated_clients,
              seed=config.seed), os.path.join(work, 'federated_finetune'))
      results[f'{target}-federated'], _ = measure(tuned.model, *ids, None, plain, reference)
      sparsity_of[f'{target}-federated'] = tuned.sparsity
      seconds['prune_federated'] = time.time() - t

    for storage in (None, 'int8'):
      results[f'{storage or "float32"}+exclude_seen'], _ = measure(model, *ids, storage, seen, reference)

    by_dim = {config.embedding_dim: {'float32': results['float32'], 'int8': results['int8'],
                                     'pruned': results[target], 'central_test_rmse': central_rmse}}
    for dim in config.size_dims:
      if dim in by_dim:
        continue
      t = time.time()
      m, mc, ui, ii, rmse = _train(config, split, dim, work)
      f32, ref = measure(m, mc, ui, ii, None, plain)
      i8, _ = measure(m, mc, ui, ii, 'int8', plain, ref)
      pruned = pruning.prune(m, 'rating', split.train, config.pruning_config(config.prune_sparsity))
      pr, _ = measure(pruned.model, mc, ui, ii, None, plain, ref)
      by_dim[dim] = {'float32': f32, 'int8': i8, 'pruned': pr, 'central_test_rmse': rmse}
      seconds[f'size_dim_{dim}'] = time.time() - t
  finally:
    shutil.rmtree(work, ignore_errors=True)

  base = results['float32']
  summary = {
      'int8_size_ratio': base['raw_bytes'] / results['int8']['raw_bytes'],
      'int8_variables_size_ratio': base['variables_raw_bytes'] / results['int8']['variables_raw_bytes'],
      'int8_rmse_delta': results['int8']['rmse'] - base['rmse'],
      'int8_max_abs_prediction_diff': results['int8']['max_abs_diff_vs_float32'],
      'prune_gzip_ratio': base['gzip_bytes'] / results[target]['gzip_bytes'],
      'prune_variables_gzip_ratio': base['variables_gzip_bytes'] / results[target]['variables_gzip_bytes'],
      'prune_rmse_delta': results[target]['rmse'] - base['rmse'],
      'recommend_p50_ms': base['recommend_p50_ms'],
      'recommend_p99_ms': base['recommend_p99_ms'],
      'int8_by_dim': {
          str(d): {'size_ratio': r['float32']['raw_bytes'] / r['int8']['raw_bytes'],
                   'variables_size_ratio': (r['float32']['variables_raw_bytes']
                                            / r['int8']['variables_raw_bytes']),
                   'rmse_delta': r['int8']['rmse'] - r['float32']['rmse'],
                   'float32_rmse': r['float32']['rmse'],
                   'prune_gzip_ratio': r['float32']['gzip_bytes'] / r['pruned']['gzip_bytes'],
                   'prune_rmse_delta': r['pruned']['rmse'] - r['float32']['rmse']}
          for d, r in sorted(by_dim.items())},
      'pruning_by_sparsity': {
          name: {'gzip_ratio': base['gzip_bytes'] / r['gzip_bytes'],
                 'rmse_delta': r['rmse'] - base['rmse']}
          for name, r in results.items() if name.startswith('pruned') and '+' not in name},
  }
  met = {
      'int8_size_ratio': summary['int8_size_ratio'] >= TARGETS['int8_size_ratio_min'],
      'int8_rmse_delta': summary['int8_rmse_delta'] <= TARGETS['int8_rmse_delta_max'],
      'prune_gzip_ratio': summary['prune_gzip_ratio'] >= TARGETS['prune_gzip_ratio_min'],
      'prune_rmse_delta': summary['prune_rmse_delta'] <= TARGETS['prune_rmse_delta_max'],
      'recommend_p50_ms': summary['recommend_p50_ms'] <= TARGETS['recommend_p50_ms_max'],
  }
  seconds['total'] = time.time() - started
  return {
      'benchmark': 'compression', 'machine': machine_info(),
      'data': {'dataset': config.dataset, 'source': info.path, 'split': split.summary(),
               'num_users': ratings.num_users, 'num_items': ratings.num_items},
      'model': {'name': 'mf', 'embedding_dim': config.embedding_dim, 'l2': config.l2,
                'epochs': config.epochs, 'learning_rate': config.learning_rate,
                'batch_size': config.batch_size, 'central_test_rmse': central_rmse},
      'pruning': {'target_sparsity': config.prune_sparsity, 'sparsities': config.sparsities,
                  'schedule': config.prune_schedule, 'basis': basis,
                  'finetune_epochs': config.finetune_epochs,
                  'finetune_l2': config.finetune_l2, 'finetune_learning_rate': config.learning_rate,
                  'federated_rounds': config.federated_rounds,
                  'federated_clients_per_round': config.federated_clients,
                  'sparsity': sparsity_of},
      'latency': {'k': 10, 'requests': config.requests, 'threads': 1, 'in_process': True},
      'results': results, 'int8_by_dim': {str(d): r for d, r in sorted(by_dim.items())},
      'summary': summary, 'targets': TARGETS, 'targets_met': met, 'seconds': seconds,
  }


def markdown(result: dict) -> str:
  s, t, met = result['summary'], result['targets'], result['targets_met']
  mark = lambda k: 'met' if met[k] else 'NOT met'
  lines = [
      '# Compression benchmark: ML-1M biased MF', '',
      f"{result['data']['split']}; MF dim {result['model']['embedding_dim']}, "
      f"{result['model']['epochs']} epochs, central test RMSE {result['model']['central_test_rmse']:.4f}.",
      f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} CPUs), "
      f"TF {result['machine']['versions'].get('tensorflow')}; latency on 1 thread, in process.", '',
      '| target | measured | goal | |', '|---|---|---|---|',
      f"| int8 export size ratio | {s['int8_size_ratio']:.2f}x (variables {s['int8_variables_size_ratio']:.2f}x) "
      f"| >= {t['int8_size_ratio_min']}x | {mark('int8_size_ratio')} |",
      f"| int8 RMSE change | {s['int8_rmse_delta']:+.5f} (max abs prediction diff {s['int8_max_abs_prediction_diff']:.4f}) "
      f"| <= +{t['int8_rmse_delta_max']} | {mark('int8_rmse_delta')} |",
      f"| {result['pruning']['target_sparsity']:.0%} pruning gzip ratio | {s['prune_gzip_ratio']:.2f}x "
      f"(variables {s['prune_variables_gzip_ratio']:.2f}x) | >= {t['prune_gzip_ratio_min']}x | {mark('prune_gzip_ratio')} |",
      f"| pruning RMSE change | {s['prune_rmse_delta']:+.5f} | <= +{t['prune_rmse_delta_max']} | {mark('prune_rmse_delta')} |",
      f"| recommend top-10 p50 / p99 | {s['recommend_p50_ms']:.3f} / {s['recommend_p99_ms']:.3f} ms "
      f"| p50 <= {t['recommend_p50_ms_max']} ms | {mark('recommend_p50_ms')} |",
      '', 'Sizes are of the whole version directory (saved_model.pb, variables/ and assets/, if any: '
      'integer id maps are stored as runs in a variable, `tff_rec.export.id_maps`) and of variables/ '
      'alone; gzip is the sum of each file compressed with gzip -9.', '',
      '| export | raw bytes | gzip bytes | variables raw | variables gzip | RMSE | MAE | max abs diff | p50 ms | p99 ms |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name, r in result['results'].items():
    lines.append(f"| {name} | {r['raw_bytes']} | {r['gzip_bytes']} | {r['variables_raw_bytes']} | "
                 f"{r['variables_gzip_bytes']} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['max_abs_diff_vs_float32']:.4f} | "
                 f"{r['recommend_p50_ms']:.3f} | {r['recommend_p99_ms']:.3f} |")
  p = result['pruning']
  basis = ('the balanced SVD basis of the MF tables (`compression.rotation`; `-trained-basis`: '
           'the same in the basis training ended in)' if p.get('basis') == 'svd' else 'the trained basis')
  lines += ['', f"Pruning: TF-MOT magnitude pruning in {basis}, {p['schedule']} schedule, "
            f"{p['finetune_epochs']} central fine-tuning epochs; "
            f"`-one-shot`: magnitude pruning without training; `-federated`: one-shot, then "
            f"{p['federated_rounds']} FedAvg rounds of {p['federated_clients_per_round']} clients with "
            'the zeros fixed (`compression.federated_finetune`).', '',
            '| pruned export | gzip ratio vs float32 | RMSE change |', '|---|---|---|']
  for name, r in s['pruning_by_sparsity'].items():
    lines.append(f"| {name} | {r['gzip_ratio']:.2f}x | {r['rmse_delta']:+.4f} |")
  fixed = {k: (result['results'][k]['raw_bytes'] - result['results'][k]['variables_raw_bytes']) / 1e3
           for k in ('float32', 'int8')}
  lines += ['', f"By MF size: int8 vs float32, and {p['target_sparsity']:.0%} pruning as above "
            f"(the saved_model.pb, {fixed['float32']:.0f} KB for float32 and {fixed['int8']:.0f} KB "
            'for int8 here, is a fixed cost, so whole-export ratios grow with the embedding size):', '',
            '| embedding dim | float32 RMSE | int8 whole export ratio | int8 variables ratio | '
            'int8 RMSE change | pruned gzip ratio | pruned RMSE change |',
            '|---|---|---|---|---|---|---|']
  for dim, r in s['int8_by_dim'].items():
    lines.append(f"| {dim} | {r['float32_rmse']:.4f} | {r['size_ratio']:.2f}x | "
                 f"{r['variables_size_ratio']:.2f}x | {r['rmse_delta']:+.5f} | "
                 f"{r['prune_gzip_ratio']:.2f}x | {r['prune_rmse_delta']:+.4f} |")
  return '\n'.join(lines) + '\n'


def write(result: dict, output_dir: str) -> tuple[str, str]:
  """Writes the JSON and Markdown results atomically."""
  os.makedirs(output_dir, exist_ok=True)
  json_path = atomic.write_json(os.path.join(output_dir, 'compression_benchmark.json'), result)
  md_path = atomic.write(os.path.join(output_dir, 'compression_benchmark.md'), markdown(result))
  return json_path, md_path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not os.path.exists(FLAGS.compression_data):
    raise app.UsageError(f'--compression_data: {FLAGS.compression_data} not found')
  try:
    config = BenchmarkConfig(
        data_dir=FLAGS.compression_data, dataset=FLAGS.compression_dataset, epochs=FLAGS.compression_epochs,
        embedding_dim=FLAGS.compression_embedding_dim, size_dims=tuple(int(d) for d in FLAGS.compression_size_dims),
        l2=FLAGS.compression_l2, learning_rate=FLAGS.compression_learning_rate, batch_size=FLAGS.compression_batch_size,
        prune_sparsity=FLAGS.compression_prune_sparsity,
        prune_sparsities=tuple(float(x) for x in FLAGS.compression_prune_sparsities),
        finetune_epochs=FLAGS.compression_finetune_epochs, finetune_l2=FLAGS.compression_finetune_l2,
        prune_schedule=FLAGS.compression_prune_schedule, prune_basis=FLAGS.compression_prune_basis,
        federated_rounds=FLAGS.compression_federated_rounds, federated_clients=FLAGS.compression_federated_clients,
        requests=FLAGS.compression_latency_requests, seed=FLAGS.compression_seed)
  except ValueError as e:
    field = str(e).split()[0]
    flag = {'requests': 'latency_requests', 'prune_sparsity': 'prune_sparsity(ies)',
            'federated_clients': 'federated_clients'}.get(field, field)
    raise app.UsageError(f'--compression_{flag}: {e}') from e
  result = run(config)
  json_path, md_path = write(result, FLAGS.compression_output_dir)
  print(markdown(result))
  print(f'wrote {json_path} and {md_path}')


if __name__ == '__main__':
  app.run(main)
