"""One central training run on the parameter-server engine, end to end (the binary's core).

Loads the data (a MovieLens split, or a synthetic large catalog), trains a
biased MF with `ps_training.train` in one process, on a loopback cluster, or
as the chief of a cluster described by `TF_CONFIG`, and writes under
`<root_output_dir>/<experiment_name>/`: `hparams.json`, `metrics.csv`
(loss per epoch), `test_metrics.json` (exact RMSE/MAE on the held-out
ratings), `cluster.json` (tasks, where each variable's shards live, peak RSS
per local task), `final_model/` (the export path's input, unsharded) and
`top_k/` (one CSV file per user shard, written by the workers).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Mapping, Optional

from absl import logging

from tff_rec import version
from tff_rec.data import splits as splits_lib
from tff_rec.distributed import cluster as cluster_lib
from tff_rec.distributed import ps_training
from tff_rec.models import predictions as predictions_lib
from tff_rec.models import registry
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import model_fns

CLUSTERS = ('none', 'loopback', 'tf_config')


@dataclasses.dataclass(frozen=True)
class SyntheticCatalog:
  """A generated data set with a large item table (instead of MovieLens)."""

  num_users: int = 10_000
  num_items: int = 2_000_000
  ratings_per_user: int = 50


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Everything a run needs (the flags of run_central_distributed)."""

  data: data_setup.DataConfig = data_setup.DataConfig()
  synthetic: Optional[SyntheticCatalog] = None  # replaces `data` when set
  model_hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # of 'mf'
  train: ps_training.PsTrainConfig = ps_training.PsTrainConfig()
  cluster: str = 'loopback'
  num_workers: int = 2
  num_ps: int = 2
  top_k: int = 10  # 0: no batch inference
  top_k_shards: int = 4
  verify_top_k: bool = False  # compare with single-process scoring
  root_output_dir: str = 'runs'
  experiment_name: str = 'central_distributed'

  def __post_init__(self):
    if self.cluster not in CLUSTERS:
      raise ValueError(f'unknown cluster {self.cluster!r}; valid: {", ".join(CLUSTERS)}')
    for name in ('num_workers', 'num_ps', 'top_k_shards'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)


def load_split(config: DistributedConfig) -> splits_lib.Split:
  """The configured MovieLens split, or the synthetic catalog split 90/10 at random."""
  if config.synthetic is None:
    return data_setup.load_split(config.data)
  s = config.synthetic
  r = ps_training.synthetic_catalog(num_users=s.num_users, num_items=s.num_items,
                                    ratings_per_user=s.ratings_per_user, seed=config.data.seed)
  return splits_lib.split_random(r, fractions=(0.9, 0.0, 0.1), seed=config.data.seed)


def model_spec(config: DistributedConfig, split: splits_lib.Split) -> model_fns.ModelSpec:
  hparams = dict(config.model_hparams)
  hparams.setdefault('global_mean', split.train.global_mean())
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', **hparams),
      num_users=split.train.num_users, num_items=split.train.num_items, task='rating',
      seed=config.train.seed, name='mf')


def _peak_rss_gib(pid: int) -> Optional[float]:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return round(int(line.split()[1]) / 2**20, 3)
  except OSError:
    return None
  return None


@dataclasses.dataclass
class DistributedResult:
  run_dir: str
  test_metrics: dict
  cluster_report: dict
  top_k_paths: list
  seconds: float


def run(config: DistributedConfig, split: Optional[splits_lib.Split] = None) -> DistributedResult:
  """Trains, evaluates, saves and (with `top_k`) scores every user; see the module docstring.

  A process that trained on a cluster stays bound to it (TF connects the
  process's eager context to the cluster): run one cluster run per process,
  as `experiments/run_central_distributed.py` does.
  """
  started = time.time()
  split = split or load_split(config)
  if split.heldout_users:
    raise ValueError('central training needs test users seen in training (a random or by_time split)')
  spec = model_spec(config, split)
  run_dir = config.run_dir
  os.makedirs(run_dir, exist_ok=True)
  artifacts.write_json(os.path.join(run_dir, 'hparams.json'), {
      'config': dataclasses.asdict(config), 'split': split.summary(),
      'versions': version.installed_versions()})
  cluster = None
  strategy = None
  try:
    if config.cluster == 'loopback':
      cluster = cluster_lib.LoopbackCluster(config.num_workers, config.num_ps,
                                            log_dir=os.path.join(run_dir, 'cluster_logs')).start()
      resolver, num_ps = cluster.resolver(), config.num_ps
    elif config.cluster == 'tf_config':
      resolver = cluster_lib.resolver_from_env()
      num_ps = len(resolver.cluster_spec().as_dict()['ps'])
    if config.cluster != 'none':
      strategy = ps_training.make_strategy(resolver, num_ps=num_ps,
                                           min_shard_bytes=config.train.min_shard_bytes)
    result = ps_training.train(spec, split.train, config.train, strategy=strategy)
    predictions = ps_training.predict(result.rec, split.test.users, split.test.items)
    test_metrics = predictions_lib.rating_metrics(predictions, split.test.ratings)
    test_metrics['train_seconds'] = result.seconds
    plain = ps_training.unsharded_copy(spec, result.rec)
    paths = []
    report = {'cluster': config.cluster,
              'tasks': cluster.cluster if cluster else (
                  resolver.cluster_spec().as_dict() if strategy else {}),
              'shards': ps_training.shard_devices(result.rec)}
    if config.top_k:
      paths = ps_training.distributed_top_k(
          result.rec, split.train, k=config.top_k, out_dir=os.path.join(run_dir, 'top_k'),
          num_shards=config.top_k_shards, strategy=strategy)
      if config.verify_top_k:
        report['top_k_check'] = compare_top_k(ps_training.read_top_k(paths),
                                              ps_training.top_k_reference(plain, split.train, config.top_k))
    if cluster is not None:
      report['peak_rss_gib'] = {name: _peak_rss_gib(pid) for name, pid in cluster.pids.items()}
    report['peak_rss_gib_chief'] = _peak_rss_gib(os.getpid())
    # Everything that runs TF happens while the cluster is up: once it is
    # connected, this process's TF context registers every new function on
    # the cluster's tasks.
    artifacts.write_json(os.path.join(run_dir, 'cluster.json'), report)
    central._write_history(os.path.join(run_dir, 'metrics.csv'), result.history)  # pylint: disable=protected-access
    artifacts.write_json(os.path.join(run_dir, 'test_metrics.json'), test_metrics)
    artifacts.save_final_model(run_dir, plain.keras_model, split.train, {
        'model': 'mf', 'hparams': dict(spec.builder.keywords), 'task': spec.task,
        'num_users': spec.num_users, 'num_items': spec.num_items,
        'user_embedding': model_fns.UserEmbedding.TABLE.value,
        'algorithm': f'central_ps_{config.cluster}', 'epochs': config.train.epochs,
        'seed': config.train.seed, 'rating_scale': list(split.train.rating_scale),
        'test_metrics': test_metrics})
  finally:
    if cluster is not None:
      cluster.stop()
  logging.info('%s: %s', run_dir, test_metrics)
  return DistributedResult(run_dir, test_metrics, report, paths, time.time() - started)


def compare_top_k(got: list, reference: list, score_atol: float = 1e-4) -> dict:
  """How distributed top-k rows match single-process ones (same user, rank order)."""
  if len(got) != len(reference):
    return {'rows': len(got), 'reference_rows': len(reference), 'equal': False}
  same_user = all(a[0] == b[0] and a[1] == b[1] for a, b in zip(got, reference))
  item_equal = sum(a[2] == b[2] for a, b in zip(got, reference))
  diff = max((abs(a[3] - b[3]) for a, b in zip(got, reference)), default=0.0)
  # Items may swap only where scores tie within float error.
  swaps_are_ties = all(a[2] == b[2] or abs(a[3] - b[3]) <= score_atol
                       for a, b in zip(got, reference))
  return {'rows': len(got), 'same_users_and_ranks': same_user, 'same_items': item_equal,
          'max_score_difference': float(diff),
          'equal': bool(same_user and swaps_are_ties and diff <= score_atol)}
