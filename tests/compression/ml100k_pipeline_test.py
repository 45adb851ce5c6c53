"""`experiments.compress_and_export` end to end from a real ML-100K training run.

Trains a small central MF on ML-100K, then runs the binary as a user would
(a subprocess with absl flags): 80% pruning in the SVD basis with central
fine-tuning, int8 storage, a TFLite artifact and the report, and checks the
export with what TF Serving checks (layout, `saved_model_cli`, a reload in a
fresh process that imports nothing from the toolkit).
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import shared_data
from tff_rec.export import serving
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  path = shared_data.shared_file('ml-100k.zip')
  root = tmp_path_factory.mktemp('ml100k_pipeline')
  config = central.CentralConfig(
      data=data_setup.DataConfig(dataset='ml-100k', data_dir=path),
      model=experiment.ModelConfig('mf', {'embedding_dim': 16, 'l2': 0.02}), epochs=3,
      batch_size=512, root_output_dir=str(root / 'runs'), experiment_name='mf', progress_bar=False)
  run = central.run_central(config)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.compress_and_export', f'--run_dir={run.run_dir}',
       f'--export_base={root / "exports"}', '--model_name=ml100k', '--version=7',
       '--prune_sparsity=0.8', '--prune_schedule=constant', '--finetune_epochs=1',
       '--quantize=int8', '--tflite=dynamic', '--exclude_seen', '--latency_requests=20'],
      cwd=shared_data.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return run, config, root / 'exports', proc.stdout


def test_layout_report_and_tflite(exported):
  _, _, base, stdout = exported
  version_dir = base / 'ml100k' / '7'
  assert f'exported {version_dir}' in stdout
  assert sorted(os.listdir(base)) == ['ml100k', 'models.config']
  assert sorted(os.listdir(base / 'ml100k')) == ['7', 'artifacts']
  for f in ('saved_model.pb', 'variables/variables.index', 'assets.extra/tf_serving_warmup_requests'):
    assert (version_dir / f).is_file(), f
  artifacts_dir = base / 'ml100k' / 'artifacts' / '7'
  with open(artifacts_dir / 'compression_report.csv') as f:
    rows = {r['artifact']: r for r in csv.DictReader(f)}
  assert set(rows) == {'float32', 'pruned0.8+int8', 'tflite-dynamic'}
  dense, small = rows['float32'], rows['pruned0.8+int8']
  # 20% of the factor tables kept; the dense bias tables and the int8 row scales count too.
  assert int(small['nonzeros']) < 0.35 * int(dense['nonzeros'])
  # Whole version dirs: the graph and warmup file are a large fixed share at this size.
  assert int(small['gzip_bytes']) < int(dense['gzip_bytes']) / 2
  assert float(small['rmse']) < float(dense['rmse']) + 0.05
  assert (artifacts_dir / 'compression_report.md').is_file()
  assert any(name.endswith('.tflite') for name in os.listdir(artifacts_dir))


def test_served_predictions_from_a_fresh_process(exported):
  run, config, base, _ = exported
  version_dir = str(base / 'ml100k' / '7')
  show = serving.cli_show(version_dir)
  assert "signature_def['serving_default']" in show and "signature_def['recommend']" in show
  _, _, user_index, item_index = artifacts.load_final_model(run.run_dir)
  split = data_setup.load_split(config.data)
  test = split.test.select(np.arange(2000))
  b = lambda ids: np.array([str(i).encode() for i in ids], dtype=object)
  got = serving.predict_in_fresh_process(version_dir, 'serving_default', {
      'user_id': b(user_index.raw_ids[test.users]), 'item_id': b(item_index.raw_ids[test.items])})
  rmse = float(np.sqrt(np.mean((got['prediction'] - test.ratings) ** 2)))
  mean_rmse = float(np.sqrt(np.mean((split.train.ratings.mean() - test.ratings) ** 2)))
  assert rmse < mean_rmse  # beats the global mean after pruning + int8
  top = serving.predict_in_fresh_process(version_dir, 'recommend', {
      'user_id': b(user_index.raw_ids[[0]]), 'k': np.int32(10)})
  seen = {item_index.raw_ids[i].encode() for i in split.train.items[split.train.users == 0]}
  assert top['item_ids'].shape == (1, 10) and not set(top['item_ids'][0].tolist()) & seen


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
