"""Compression benchmark on MovieLens-1M biased MF: size, accuracy and latency.

  python -m benchmarks.compression_benchmark --compression_data=../shared/data/ml-1m.zip

Flags carry a `compression_` prefix so this module can be imported next to
the experiment binaries (absl flags are global).

Trains a central biased MF (random 90/10 split), then measures through the
exported SavedModels (TF Serving layout, `tff_rec.export.serving`):

* int8 storage vs float32: export size (raw bytes of the version directory
  and of `variables/` only) and test RMSE change (targets: >= 3.5x smaller,
  RMSE +0.005 at most);
* 80% magnitude pruning (polynomial schedule, 3 epochs of central fine-tuning
  at row L2 0.01): gzip size
  of the export vs float32 and RMSE change (targets: >= 3x, +0.01 at most);
* `recommend` top-10 over all items for one user per request, from the
  loaded SavedModel in this process on one core (intra- and inter-op
  parallelism 1, set before any op runs, so training runs on one thread
  too): p50 / p99 latency (target p50 <= 2 ms), float32 and int8, with and
  without `exclude_seen`.

Targets are reported, not asserted. Writes `compression_benchmark.json` (with
machine info and versions) and `compression_benchmark.md` to --output_dir.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from compression import pruning
from compression import quantization
from compression import report
from tff_rec import atomic
from tff_rec import version
from tff_rec.data import sources
from tff_rec.data import splits
from tff_rec.export import serving
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import optimizers

_DATA_DIR = flags.DEFINE_string(
    'compression_data', os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             'shared', 'data', 'ml-1m.zip'),
    'ml-1m.zip (or its directory).')
_OUTPUT_DIR = flags.DEFINE_string('compression_output_dir', 'runs/benchmarks/compression',
                                  'Where the JSON and Markdown results go.')
_EPOCHS = flags.DEFINE_integer('compression_epochs', 8, 'Central MF training epochs.')
_EMBEDDING_DIM = flags.DEFINE_integer('compression_embedding_dim', 32, 'MF factors.')
_L2 = flags.DEFINE_float('compression_l2', 0.04, 'MF row L2.')
_LEARNING_RATE = flags.DEFINE_float('compression_learning_rate', 0.002, 'Adam learning rate.')
_BATCH_SIZE = flags.DEFINE_integer('compression_batch_size', 1024, 'Training batch size.')
_PRUNE_SPARSITY = flags.DEFINE_float('compression_prune_sparsity', 0.8, 'Pruning target sparsity.')
_FINETUNE_EPOCHS = flags.DEFINE_integer('compression_finetune_epochs', 3, 'Pruning fine-tuning epochs.')
_FINETUNE_L2 = flags.DEFINE_float('compression_finetune_l2', 0.01, 'Row L2 while fine-tuning the pruned model.')
_REQUESTS = flags.DEFINE_integer('compression_latency_requests', 1000, 'Timed recommend requests.')
_SEED = flags.DEFINE_integer('compression_seed', 0, 'Split and initialization seed.')

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
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  versions = dict(version.installed_versions())
  for name in ('tensorflow-serving-api', 'numpy'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {'platform': platform.platform(), 'python': sys.version.split()[0], 'cpu': cpu,
          'cpu_count': os.cpu_count(), 'versions': versions,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def run(data_dir: str, output_dir: str, *, epochs: int, embedding_dim: int, l2: float,
        learning_rate: float, batch_size: int, prune_sparsity: float, finetune_epochs: int,
        finetune_l2: float, requests: int, seed: int) -> dict:
  """Trains, compresses, exports and measures; returns the results."""
  _single_core()

  started = time.time()
  ratings, info = sources.load_movielens('ml-1m', data_dir=data_dir, allow_download=False)
  split = splits.split_random(ratings, fractions=(0.9, 0.0, 0.1), seed=seed)
  work = tempfile.mkdtemp(prefix='compression_benchmark_')
  try:
    config = central.CentralConfig(
        data=data_setup.DataConfig(dataset='ml-1m', data_dir=data_dir, test_fraction=0.1, seed=seed),
        model=experiment.ModelConfig('mf', {'embedding_dim': embedding_dim, 'l2': l2}),
        optimizer=optimizers.OptimizerConfig('adam', learning_rate), epochs=epochs,
        batch_size=batch_size, root_output_dir=work, experiment_name='mf', seed=seed,
        progress_bar=False)
    trained = central.run_central(config, split=split)
    train_seconds = time.time() - started
    rec, model_config, user_index, item_index = artifacts.load_final_model(trained.run_dir)
    model = rec.keras_model

    t = time.time()
    pruned = pruning.prune(model, 'rating', split.train, pruning.PruningConfig(
        prune_sparsity, 'polynomial', finetune_epochs=finetune_epochs, batch_size=batch_size,
        learning_rate=learning_rate, finetune_l2=finetune_l2, seed=seed))
    prune_seconds = time.time() - t

    exports = os.path.join(work, 'exports')
    plain = serving.ExportOptions(warmup=False)
    seen = serving.ExportOptions(exclude_seen=True, warmup=False)
    variants = {
        'float32': (model, None, plain),
        'int8': (model, 'int8', plain),
        'float16': (model, 'float16', plain),
        f'pruned{prune_sparsity:g}': (pruned.model, None, plain),
        f'pruned{prune_sparsity:g}+int8': (pruned.model, 'int8', plain),
        'float32+exclude_seen': (model, None, seen),
        'int8+exclude_seen': (model, 'int8', seen),
    }
    results, predictions = {}, {}
    for n, (name, (keras_model, storage, options)) in enumerate(variants.items()):
      exported = serving.export(keras_model, model_config, user_index, item_index, exports,
                                'mf', n + 1, options, seen=split.train,
                                storage_fn=quantization.storage_fn(storage or 'none'))
      raw, gz = report.disk_bytes(exported.version_dir)
      var_raw, var_gz = report.disk_bytes(os.path.join(exported.version_dir, 'variables'))
      predictions[name] = report.predict_export(exported.version_dir, model_config, user_index,
                                                item_index, split.train, split.test)
      err = predictions[name] - split.test.ratings
      metrics = {'rmse': float(np.sqrt(np.mean(err ** 2))), 'mae': float(np.mean(np.abs(err))),
                 'max_abs_diff_vs_float32': float(np.max(np.abs(predictions[name] - predictions['float32'])))}
      p50, p99 = report.recommend_latency(exported.version_dir, model_config, user_index,
                                          item_index, split.train, k=10, requests=requests,
                                          warmup=50, seed=seed)
      results[name] = {'raw_bytes': raw, 'gzip_bytes': gz, 'variables_raw_bytes': var_raw,
                       'variables_gzip_bytes': var_gz, **metrics, 'recommend_p50_ms': p50,
                       'recommend_p99_ms': p99}
      logging.info('%s: %s', name, results[name])
  finally:
    shutil.rmtree(work, ignore_errors=True)

  base = results['float32']
  pname = f'pruned{prune_sparsity:g}'
  summary = {
      'int8_size_ratio': base['raw_bytes'] / results['int8']['raw_bytes'],
      'int8_variables_size_ratio': base['variables_raw_bytes'] / results['int8']['variables_raw_bytes'],
      'int8_rmse_delta': results['int8']['rmse'] - base['rmse'],
      'int8_max_abs_prediction_diff': results['int8']['max_abs_diff_vs_float32'],
      'prune_gzip_ratio': base['gzip_bytes'] / results[pname]['gzip_bytes'],
      'prune_variables_gzip_ratio': base['variables_gzip_bytes'] / results[pname]['variables_gzip_bytes'],
      'prune_rmse_delta': results[pname]['rmse'] - base['rmse'],
      'recommend_p50_ms': base['recommend_p50_ms'],
      'recommend_p99_ms': base['recommend_p99_ms'],
  }
  met = {
      'int8_size_ratio': summary['int8_size_ratio'] >= TARGETS['int8_size_ratio_min'],
      'int8_rmse_delta': summary['int8_rmse_delta'] <= TARGETS['int8_rmse_delta_max'],
      'prune_gzip_ratio': summary['prune_gzip_ratio'] >= TARGETS['prune_gzip_ratio_min'],
      'prune_rmse_delta': summary['prune_rmse_delta'] <= TARGETS['prune_rmse_delta_max'],
      'recommend_p50_ms': summary['recommend_p50_ms'] <= TARGETS['recommend_p50_ms_max'],
  }
  return {
      'benchmark': 'compression', 'machine': machine_info(),
      'data': {'dataset': 'ml-1m', 'source': info.path, 'split': split.summary(),
               'num_users': ratings.num_users, 'num_items': ratings.num_items},
      'model': {'name': 'mf', 'embedding_dim': embedding_dim, 'l2': l2, 'epochs': epochs,
                'learning_rate': learning_rate, 'batch_size': batch_size,
                'central_test_rmse': trained.test_metrics['rmse']},
      'pruning': {'target_sparsity': prune_sparsity, 'schedule': 'polynomial',
                  'finetune_epochs': finetune_epochs, 'finetune_l2': finetune_l2,
                  'finetune_learning_rate': learning_rate, 'sparsity': pruned.sparsity},
      'latency': {'k': 10, 'requests': requests, 'threads': 1, 'in_process': True},
      'results': results, 'summary': summary, 'targets': TARGETS, 'targets_met': met,
      'seconds': {'train': train_seconds, 'prune': prune_seconds, 'total': time.time() - started},
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
      '', 'Sizes are of the whole version directory (saved_model.pb, variables/, assets/ with the id '
      'maps) and of variables/ alone; gzip is the sum of each file compressed with gzip -9.', '',
      '| export | raw bytes | gzip bytes | variables raw | variables gzip | RMSE | MAE | max abs diff | p50 ms | p99 ms |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name, r in result['results'].items():
    lines.append(f"| {name} | {r['raw_bytes']} | {r['gzip_bytes']} | {r['variables_raw_bytes']} | "
                 f"{r['variables_gzip_bytes']} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['max_abs_diff_vs_float32']:.4f} | "
                 f"{r['recommend_p50_ms']:.3f} | {r['recommend_p99_ms']:.3f} |")
  return '\n'.join(lines) + '\n'


def write(result: dict, output_dir: str) -> tuple[str, str]:
  """Writes the JSON and Markdown results atomically."""
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for name, text in (('compression_benchmark.json', json.dumps(result, indent=2) + '\n'),
                     ('compression_benchmark.md', markdown(result))):
    paths.append(atomic.write(os.path.join(output_dir, name), text))
  return paths[0], paths[1]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not os.path.exists(_DATA_DIR.value):
    raise app.UsageError(f'--compression_data: {_DATA_DIR.value} not found')
  if not 0 < _PRUNE_SPARSITY.value < 1:
    raise app.UsageError(f'--compression_prune_sparsity must be in (0, 1), got {_PRUNE_SPARSITY.value}')
  for flag in (_EPOCHS, _EMBEDDING_DIM, _BATCH_SIZE, _FINETUNE_EPOCHS, _REQUESTS):
    if flag.value <= 0:
      raise app.UsageError(f'--{flag.name} must be positive, got {flag.value}')
  result = run(_DATA_DIR.value, _OUTPUT_DIR.value, epochs=_EPOCHS.value,
               embedding_dim=_EMBEDDING_DIM.value, l2=_L2.value, learning_rate=_LEARNING_RATE.value,
               batch_size=_BATCH_SIZE.value, prune_sparsity=_PRUNE_SPARSITY.value,
               finetune_epochs=_FINETUNE_EPOCHS.value, finetune_l2=_FINETUNE_L2.value,
               requests=_REQUESTS.value, seed=_SEED.value)
  json_path, md_path = write(result, _OUTPUT_DIR.value)
  print(markdown(result))
  print(f'wrote {json_path} and {md_path}')


if __name__ == '__main__':
  app.run(main)
