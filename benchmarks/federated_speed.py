"""Seconds per FedAvg round on TFF's C++ runtime, against a central Keras epoch.

For each scenario (data set, clients per round) and each variant of the
runtime set-up, one process runs a warm-up round, then timed rounds, and a
central Keras epoch over exactly the same batches (the clients' own
per-user batches, in client order: same model, batch size and number of
optimizer steps), so the ratio round / epoch is measured under the same
machine load. Peak RSS covers this process and the TFF worker_binary child.

Variants: `before` is the set-up of the code before this benchmark existed
(`tf.data.Dataset.reduce` client loop, ratings embedded as constants of the
dataset computation, one call per round); `after` is the fast one
(`DATASET_ITERATOR` loop, one file per user read worker-side, rounds split
into subrounds of bounded size). Both give the same model (tested in
tests/benchmarks/equivalence_test.py).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import tempfile
import time
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import common
from tff_rec import runtime
from tff_rec.data import federated
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import sources
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import model_fns
from tff_rec.training import optimizers
from tff_rec.training import sampling

NAME = 'federated_speed'


@dataclasses.dataclass(frozen=True)
class Variant:
  """How the federated round is set up (none of it changes the results)."""

  name: str
  loop_implementation: str  # algorithms.LOOP_IMPLEMENTATIONS
  storage: str  # 'table' (constants in the computation) or 'files' (one per user)
  clients_per_subround: Optional[int] = None
  max_concurrent_computation_calls: int = -1


BEFORE = Variant('before', loop_implementation='reduce', storage='table')
AFTER = Variant('after', loop_implementation='iterator', storage='files', clients_per_subround=500)
# Ablation: only the client loop changed.
ITERATOR_ONLY = Variant('iterator_only', loop_implementation='iterator', storage='table')
VARIANTS = {v.name: v for v in (BEFORE, AFTER, ITERATOR_ONLY)}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Model and training hyperparameters shared by all scenarios."""

  batch_size: int = 32
  embedding_dim: int = 32
  client_learning_rate: float = 0.1
  server_learning_rate: float = 1.0
  seed: int = 0


def load(dataset: str, data_dir: Optional[str]) -> ratings_lib.Ratings:
  """All ratings of a MovieLens data set, or small synthetic ones ('synthetic')."""
  if dataset == 'synthetic':
    return synthetic.synthetic_ratings(num_users=120, num_items=60, rank=4, noise_std=0.3,
                                       mean_ratings_per_user=20.0, seed=0).ratings
  r, _ = sources.load_movielens(dataset, data_dir=data_dir)
  return r


def model_spec(r: ratings_lib.Ratings, setup: Setup) -> model_fns.ModelSpec:
  """Biased MF over `r`'s catalog."""
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', embedding_dim=setup.embedding_dim,
                                global_mean=float(r.global_mean())),
      num_users=r.num_users, num_items=r.num_items, task='rating', seed=setup.seed)


def dataset_config(setup: Setup) -> federated.ClientDatasetConfig:
  return federated.ClientDatasetConfig(batch_size=setup.batch_size, seed=setup.seed)


class FederatedRunner:
  """A FedAvg process composed with worker-side datasets, on a fresh local worker."""

  def __init__(self, r: ratings_lib.Ratings, variant: Variant, row_sparse_mean: bool,
               setup: Setup, storage_dir: Optional[str]):
    self.worker = runtime.set_local_context(
        max_concurrent_computation_calls=variant.max_concurrent_computation_calls,
        clients_per_subround=variant.clients_per_subround)
    spec = model_spec(r, setup)
    config = algorithms.AlgorithmConfig(
        name='fedavg',
        client_optimizer=optimizers.OptimizerConfig('sgd', setup.client_learning_rate),
        server_optimizer=optimizers.OptimizerConfig('sgd', setup.server_learning_rate),
        row_sparse_mean=row_sparse_mean,
    )
    self.process = algorithms.build_process(config, spec, model_fns.UserEmbedding.TABLE,
                                            loop_implementation=variant.loop_implementation)
    data = federated.client_data(
        r, dataset_config(setup), storage_dir=storage_dir if variant.storage == 'files' else None)
    self.composed = tff.simulation.compose_dataset_computation_with_learning_process(
        data.dataset_computation, self.process)
    self.state = self.composed.initialize()

  def round(self, client_ids: Sequence[str]) -> dict:
    """Runs one round (state carried over); its metrics."""
    out = self.composed.next(self.state, list(client_ids))
    self.state = out.state
    return out.metrics

  def weights(self):
    return self.process.get_model_weights(self.state)


class CentralRunner:
  """Keras `fit` on the clients' own batches (same steps as one FedAvg round)."""

  def __init__(self, r: ratings_lib.Ratings, setup: Setup):
    spec = model_spec(r, setup)
    self.model = spec.build(model_fns.UserEmbedding.TABLE).keras_model
    self.model.compile(optimizer=tf.keras.optimizers.SGD(setup.client_learning_rate),
                       loss=model_fns.loss_fn(spec.task)())
    self._dataset_fn = federated.make_dataset_fn(r, dataset_config(setup))

  def dataset(self, client_ids: Sequence[str]) -> tf.data.Dataset:
    ids = tf.data.Dataset.from_tensor_slices(tf.constant(list(client_ids)))
    return ids.flat_map(self._dataset_fn).map(lambda e: (e['x'], e['y']))

  def epoch(self, client_ids: Sequence[str]) -> dict:
    """Seconds of one epoch and its number of optimizer steps."""
    ds = self.dataset(client_ids)
    before = int(self.model.optimizer.iterations.numpy())
    seconds, _ = common.timed(self.model.fit, ds, epochs=1, verbose=0)
    return {'seconds': seconds, 'steps': int(self.model.optimizer.iterations.numpy()) - before}


def client_ids(r: ratings_lib.Ratings, clients: int, seed: int, round_num: int) -> list[str]:
  """The clients of one round: all users, or a seeded sample (as in training)."""
  users = r.present_users()
  sampler = sampling.ClientSampler(users, min(clients, len(users)), seed)
  return sampler(round_num)


def _examples(r: ratings_lib.Ratings, ids: Sequence[str]) -> int:
  counts = np.bincount(r.users, minlength=r.num_users)
  return int(sum(counts[int(c.split(':')[0])] for c in ids))


def measure_rounds(r, variant: Variant, row_sparse_mean: bool, setup: Setup, client_counts,
                   timed_rounds: int, storage_dir: str, with_central: bool = True) -> list:
  """For each clients-per-round count: seconds per round (and per central epoch)."""
  rows = []
  started = time.perf_counter()
  runner = FederatedRunner(r, variant, row_sparse_mean, setup, storage_dir)
  build_seconds = time.perf_counter() - started
  central = None
  for clients in client_counts:
    # Warm-up: the first round traces and compiles; each new number of clients
    # also makes TFF's runtime build (and cache) a new executor.
    warm_ids = client_ids(r, clients, setup.seed, 1)
    first_seconds, _ = common.timed(runner.round, warm_ids)
    if with_central and central is None:
      # Built after TFF's tracing: a Keras model built before it cannot `fit` after it.
      central = CentralRunner(r, setup)
      central.epoch(warm_ids)
    times, central_times, loss = [], [], None
    with common.PeakMemory([runner.worker.worker_pid]) as memory:
      for k in range(timed_rounds):
        ids = client_ids(r, clients, setup.seed, 2 + k)
        seconds, metrics = common.timed(runner.round, ids)
        times.append(seconds)
        loss = float(metrics['client_work']['train']['loss'])
    steps = None
    if central is not None:
      for k in range(timed_rounds):
        epoch = central.epoch(client_ids(r, clients, setup.seed, 2 + k))
        central_times.append(epoch['seconds'])
        steps = epoch['steps']
    ids = client_ids(r, clients, setup.seed, 2)
    examples = _examples(r, ids)
    round_s = statistics.median(times)
    row = {
        'variant': variant.name,
        'row_sparse_mean': row_sparse_mean,
        'clients': len(ids),
        'examples': examples,
        'optimizer_steps': steps,
        'round_seconds': round_s,
        'round_seconds_all': times,
        'warmup_round_seconds': first_seconds,
        'build_seconds': build_seconds,
        'clients_per_second': len(ids) / round_s,
        'examples_per_second': examples / round_s,
        'train_loss': loss,
        **memory.result,
    }
    if central_times:
      epoch_s = statistics.median(central_times)
      row.update({
          'central_epoch_seconds': epoch_s,
          'central_epoch_seconds_all': central_times,
          'ratio_to_central': round_s / epoch_s,
          'overhead_ms_per_client': 1000.0 * (round_s - epoch_s) / len(ids),
      })
    logging.info('%s', {k: v for k, v in row.items() if not k.endswith('_all')})
    rows.append(row)
  runtime.stop_all_workers()
  return rows


@dataclasses.dataclass(frozen=True)
class Scenario:
  name: str
  dataset: str
  client_counts: tuple[int, ...]
  variants: tuple[str, ...] = ('before', 'after')
  row_sparse_means: tuple[bool, ...] = (False, True)
  timed_rounds: int = 2
  # Variant name -> largest client count it is run at (e.g. memory of 'before').
  max_clients: tuple[tuple[str, int], ...] = ()


def scenarios(smoke: bool) -> list[Scenario]:
  """What `run` measures (tiny synthetic ones with `smoke`)."""
  if smoke:
    return [
        Scenario('smoke_all_users', 'synthetic', (120,), row_sparse_means=(False,), timed_rounds=1),
        Scenario('smoke_scaling', 'synthetic', (10, 40), variants=('after',),
                 row_sparse_means=(True,), timed_rounds=1),
    ]
  return [
      Scenario('ml100k_all_users', 'ml-100k', (943,), variants=('before', 'after', 'iterator_only')),
      Scenario('ml1m_100_clients', 'ml-1m', (100,), timed_rounds=3,
               variants=('before', 'after', 'iterator_only')),
      # 'before' holds every client's update at once: ~4 MB per ML-1M client
      # in the worker, so 6040 clients would need ~24 GiB.
      Scenario('ml1m_scaling', 'ml-1m', (10, 100, 1000, 6040), timed_rounds=1,
               max_clients=(('before', 1000),)),
  ]


def _fits(rows: list) -> list:
  """Per (variant, aggregator): round time = a + b * clients, b in ms."""
  out = []
  keys = sorted({(r['variant'], r['row_sparse_mean']) for r in rows})
  for variant, rsm in keys:
    sel = [r for r in rows if r['variant'] == variant and r['row_sparse_mean'] == rsm]
    if len(sel) < 2:
      continue
    fit = common.linear_fit([r['clients'] for r in sel], [r['round_seconds'] for r in sel])
    entry = {'variant': variant, 'row_sparse_mean': rsm, 'a_seconds': fit['a'],
             'b_ms_per_client': 1000 * fit['b'], 'r2': fit['r2'],
             'clients': [r['clients'] for r in sel]}
    central = [r for r in sel if r.get('central_epoch_seconds') is not None]
    if len(central) >= 2:
      cfit = common.linear_fit([r['clients'] for r in central],
                               [r['central_epoch_seconds'] for r in central])
      entry['central_b_ms_per_client'] = 1000 * cfit['b']
      entry['overhead_b_ms_per_client'] = 1000 * (fit['b'] - cfit['b'])
    out.append(entry)
  return out


def run(out_dir: str, smoke: bool = False, data_dir: Optional[str] = None,
        only_scenarios: Sequence[str] = (), variants: Sequence[str] = ()) -> str:
  """Runs the scenarios; writes federated_speed.json/.md in `out_dir`; the JSON path."""
  started = time.time()
  setup = Setup()
  results = {}
  with tempfile.TemporaryDirectory(prefix='tff_rec_shards_') as storage_dir:
    for scenario in scenarios(smoke):
      if only_scenarios and scenario.name not in only_scenarios:
        continue
      r = load(scenario.dataset, data_dir)
      rows = []
      for name in scenario.variants:
        if variants and name not in variants:
          continue
        cap = dict(scenario.max_clients).get(name)
        counts = [c for c in scenario.client_counts if cap is None or c <= cap]
        for rsm in scenario.row_sparse_means:
          logging.info('%s: %s row_sparse_mean=%s clients=%s', scenario.name, name, rsm, counts)
          rows += measure_rounds(r, VARIANTS[name], rsm, setup, counts, scenario.timed_rounds,
                                 storage_dir)
      results[scenario.name] = {
          'dataset': scenario.dataset,
          'users': int(len(r.present_users())),
          'ratings': int(r.num_ratings),
          'skipped': [{'variant': v, 'clients_above': c,
                       'why': 'all client updates are held at once: out of memory'}
                      for v, c in scenario.max_clients
                      if (not variants or v in variants) and v in scenario.variants],
          'rows': rows,
          'fits': _fits(rows) if len(scenario.client_counts) > 1 else [],
      }
  parameters = {
      'setup': dataclasses.asdict(setup),
      'model': 'biased MF (mf), one user row per user, rating task (MSE)',
      'algorithm': 'FedAvg (weighted by examples), client SGD, server SGD',
      'variants': {k: dataclasses.asdict(v) for k, v in VARIANTS.items()},
      'scenarios': [dataclasses.asdict(s) for s in scenarios(smoke)],
      'smoke': smoke,
      'only_scenarios': list(only_scenarios),
      'only_variants': list(variants),
      'timing': 'median of timed rounds after one warm-up round; central: median of '
                'Keras epochs over the same batches after a warm-up epoch',
  }
  return common.write_result(out_dir, NAME, parameters, results, summary(results), started)


def summary(results: dict) -> str:
  """The Markdown summary."""
  lines = ['# Federated round speed (FedAvg, biased MF dim 32, batch 32)', '',
           common.machine_line(), '']
  columns = ['variant', 'row_sparse_mean', 'clients', 'examples', 'round_seconds',
             'central_epoch_seconds', 'ratio_to_central', 'overhead_ms_per_client',
             'clients_per_second', 'examples_per_second', 'peak_rss_worker_gib',
             'peak_rss_python_gib']
  for name, res in results.items():
    lines += [f'## {name} ({res["dataset"]}, {res["users"]} users)', '',
              common.markdown_table(res['rows'], columns), '']
    if res['fits']:
      lines += ['Round time = a + b * clients:', '',
                common.markdown_table(res['fits'], ['variant', 'row_sparse_mean', 'a_seconds',
                                                    'b_ms_per_client', 'central_b_ms_per_client',
                                                    'overhead_b_ms_per_client', 'r2']), '']
    for s in res['skipped']:
      lines.append(f'Not run: {s["variant"]} above {s["clients_above"]} clients ({s["why"]}).')
  return '\n'.join(lines)
