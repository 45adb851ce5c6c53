"""`benchmarks.compression_benchmark` runs end to end (on ML-100K, tiny settings) and reports.

Numbers are not checked against the targets (they are measured, never
asserted); the test checks that every variant is exported and measured.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import shared_data
from tff_rec import version


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  data = shared_data.shared_file('ml-100k.zip')
  out = tmp_path_factory.mktemp('compression_bench')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.compression_benchmark', f'--compression_data={data}',
       '--compression_dataset=ml-100k', f'--compression_output_dir={out}',
       '--compression_epochs=2', '--compression_embedding_dim=8', '--compression_size_dims=16',
       '--compression_prune_sparsities=0.5', '--compression_prune_sparsity=0.7',
       '--compression_finetune_epochs=1', '--compression_federated_rounds=1',
       '--compression_federated_clients=5', '--compression_latency_requests=20'],
      cwd=shared_data.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(out, 'compression_benchmark.json')) as f:
    loaded = json.load(f)
  with open(os.path.join(out, 'compression_benchmark.md')) as f:
    return loaded, f.read()


def test_every_variant_is_measured(result):
  loaded, _ = result
  assert set(loaded['results']) == {
      'float32', 'int8', 'float16', 'pruned0.5', 'pruned0.7', 'pruned0.7+int8',
      'pruned0.7-one-shot', 'pruned0.7-federated', 'pruned0.7-trained-basis',
      'float32+exclude_seen', 'int8+exclude_seen'}
  assert loaded['pruning']['basis'] == 'svd'
  for name, row in loaded['results'].items():
    assert row['raw_bytes'] > 0 and row['gzip_bytes'] > 0, name
    assert np.isfinite(row['rmse']) and row['recommend_p50_ms'] > 0, name
  r = loaded['results']
  assert r['int8']['variables_raw_bytes'] < r['float32']['variables_raw_bytes'] / 3
  assert r['pruned0.7']['gzip_bytes'] < r['pruned0.5']['gzip_bytes'] < r['float32']['gzip_bytes']
  sparsity = loaded['pruning']['sparsity']['pruned0.7-federated']
  assert sparsity['item_embedding/embeddings:0'] == pytest.approx(0.7, abs=0.01)


def test_summary_targets_and_markdown(result):
  loaded, md = result
  assert set(loaded['summary']['int8_by_dim']) == {'8', '16'}
  assert set(loaded['targets_met']) == set(k.rsplit('_', 1)[0] if k.endswith(('_min', '_max')) else k
                                           for k in loaded['targets'])
  assert all(isinstance(v, bool) for v in loaded['targets_met'].values())
  assert loaded['machine']['versions']['tensorflow-federated']
  assert loaded['machine']['cpu'] == version.cpu_model()
  assert md.startswith('# Compression benchmark') and 'pruned0.7-federated' in md
  assert '| 16 |' in md
  for dim in ('8', '16'):
    assert np.isfinite(loaded['summary']['int8_by_dim'][dim]['prune_rmse_delta'])
    assert loaded['summary']['int8_by_dim'][dim]['prune_gzip_ratio'] > 1


def test_bad_flag_names_the_flag(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.compression_benchmark', f'--compression_data={tmp_path}',
       '--compression_federated_rounds=-1', f'--compression_output_dir={tmp_path / "out"}'],
      cwd=shared_data.REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert '--compression_federated_rounds' in proc.stderr
  assert not (tmp_path / 'out').exists()


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
