"""Parameter-server training on a loopback cluster: sharded tables, same model quality,
distributed top-k equal to single-process scoring, the export path unchanged, no process left."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests import processes
from tests import shared_data
from tff_rec.distributed import cluster as cluster_lib
from tff_rec.distributed import ps_training
from tff_rec.export import serving
from tff_rec.training import artifacts

_FLAGS = ['--epochs=10', '--batch_size=256', '--optimizer=adagrad', '--learning_rate=1.0',
          '--min_shard_bytes=1024', '--embedding_dim=8', '--l2=0.01', '--top_k=5',
          '--top_k_shards=3', '--verify_top_k', '--progress_bar=false',
          '--synthetic_items=100', '--synthetic_users=1000', '--synthetic_ratings_per_user=40']


class _Run:
  """What a run of the binary wrote."""

  def __init__(self, run_dir):
    self.run_dir = run_dir
    with open(os.path.join(run_dir, 'cluster.json')) as f:
      self.cluster_report = json.load(f)
    with open(os.path.join(run_dir, 'test_metrics.json')) as f:
      self.test_metrics = json.load(f)
    top_k = os.path.join(run_dir, 'top_k')
    self.top_k_paths = sorted(os.path.join(top_k, n) for n in os.listdir(top_k))


def run_binary(root, cluster: str, *extra: str) -> _Run:
  """The binary in its own process (a process that used a cluster stays bound to it)."""
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run_central_distributed', f'--cluster={cluster}',
       f'--root_output_dir={root}', f'--experiment_name={cluster}', *_FLAGS, *extra],
      cwd=shared_data.REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return _Run(os.path.join(root, cluster))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('ps')
  return {c: run_binary(str(root), c) for c in ('none', 'loopback')}


def test_tables_are_sharded_over_both_parameter_servers(runs):
  shards = runs['loopback'].cluster_report['shards']
  for table in ('user_embedding/embeddings:0', 'item_embedding/embeddings:0'):
    # One shard on each ps (which ps holds the first shard follows TF's round-robin placement).
    assert sorted(shards[table]) == [f'/job:ps/replica:0/task:{k}/device:CPU:0' for k in (0, 1)]
  assert set(runs['loopback'].cluster_report['peak_rss_gib']) == {'ps0', 'ps1', 'worker0', 'worker1'}


def test_cluster_training_matches_single_process_quality(runs):
  single = runs['none'].test_metrics['rmse']
  distributed = runs['loopback'].test_metrics['rmse']
  assert single < 0.8  # Both learn: predicting the mean gives 1.08 here.
  # Asynchronous parameter-server updates (two workers, stale reads, Adagrad 1.0) make the cluster
  # run vary: over five runs of this tiny configuration (1000 users x 100 items, dim 8) it was
  # 0.000001 to 0.021 from the deterministic single-process 0.6969. The toolkit's criterion (within
  # 0.005 on ML-1M) is measured on the real data in the README; here a 2x margin over that spread.
  assert abs(single - distributed) < 0.04


def test_distributed_top_k_equals_single_process_scoring(runs):
  check = runs['loopback'].cluster_report['top_k_check']
  assert check['equal'] and check['same_users_and_ranks'], check
  assert len(runs['loopback'].top_k_paths) == 3
  for path in runs['loopback'].top_k_paths:
    assert os.path.basename(path).startswith('top_k-') and not os.path.exists(path + '.tmp')
  rows = ps_training.read_top_k(runs['loopback'].top_k_paths)
  assert len(rows) == 1000 * 5 and rows[0][1] == 1


def test_no_task_process_is_left_after_a_run(runs):
  del runs
  leftovers = [p for p in psutil.process_iter(['cmdline'])
               if 'serve_task_from_env' in ' '.join(p.info['cmdline'] or [])]
  assert not leftovers


def test_the_export_path_takes_the_distributed_model_unchanged(runs, tmp_path):
  rec, config, users, items = artifacts.load_final_model(runs['loopback'].run_dir)
  result = serving.export(rec.keras_model, config, users, items, str(tmp_path), 'mf', 1)
  fn = serving.load_signature(result.version_dir, 'recommend')
  out = fn(user_id=np.array([users.raw_ids[0]]), k=np.array(3))
  assert out['item_ids'].shape[-1] == 3


def test_children_die_with_a_killed_chief(tmp_path):
  script = ('import time\nfrom tff_rec.distributed import cluster\n'
            'c = cluster.LoopbackCluster(1, 1).start()\nprint("ready", flush=True)\ntime.sleep(600)\n')
  chief = subprocess.Popen([sys.executable, '-c', script], cwd=shared_data.REPO_ROOT,
                           stdout=subprocess.PIPE, text=True)
  try:
    assert chief.stdout.readline().strip() == 'ready'
    children = psutil.Process(chief.pid).children()
    assert len(children) == 2
    os.kill(chief.pid, signal.SIGKILL)
    chief.wait()
    for child in children:
      assert processes.gone(child.pid), f'task pid {child.pid} outlived its chief'
  finally:
    if chief.poll() is None:
      chief.kill()


def test_tf_config_errors_name_the_problem(monkeypatch):
  monkeypatch.delenv('TF_CONFIG', raising=False)
  with pytest.raises(cluster_lib.ClusterError, match='TF_CONFIG is not set'):
    cluster_lib.read_tf_config()
  monkeypatch.setenv('TF_CONFIG', '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}')
  with pytest.raises(cluster_lib.ClusterError, match='no ps tasks'):
    cluster_lib.read_tf_config()
  good = cluster_lib.tf_config({'chief': ['c:1'], 'worker': ['w:1'], 'ps': ['p:1']}, 'ps', 0)
  monkeypatch.setenv('TF_CONFIG', good)
  assert cluster_lib.read_tf_config()[1:] == ('ps', 0)
  with pytest.raises(cluster_lib.ClusterError, match='runs as the chief'):
    cluster_lib.resolver_from_env()
  with pytest.raises(cluster_lib.ClusterError, match='not in the cluster'):
    cluster_lib.tf_config({'chief': ['c:1'], 'worker': ['w:1'], 'ps': ['p:1']}, 'ps', 3)


def test_adam_is_refused_with_the_reason():
  with pytest.raises(ValueError, match='whole tables'):
    ps_training.PsTrainConfig(optimizer='adam')


def test_synthetic_catalog_has_distinct_pairs_over_the_whole_catalog():  # pylint: disable=missing-function-docstring
  r = ps_training.synthetic_catalog(num_users=50, num_items=60, ratings_per_user=40, seed=1)
  keys = r.users.astype(np.int64) * 60 + r.items
  assert len(np.unique(keys)) == r.num_ratings == 50 * 40
  assert r.num_items == 60 and set(np.unique(r.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.slow
def test_binary_on_real_movielens_loopback(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.run_central_distributed', '--dataset=ml-100k',
       f'--data_dir={data_dir}', '--cluster=loopback', '--epochs=2', '--min_shard_bytes=65536',
       '--top_k=5', '--top_k_shards=2', '--verify_top_k', '--progress_bar=false',
       f'--root_output_dir={tmp_path}', '--experiment_name=ml100k'],
      cwd=shared_data.REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'ml100k' / 'cluster.json') as f:
    report = json.load(f)
  assert report['top_k_check']['equal']
  assert len(report['shards']['user_embedding/embeddings:0']) == 2
  with open(tmp_path / 'ml100k' / 'test_metrics.json') as f:
    assert 0.85 < json.load(f)['rmse'] < 1.2


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
