"""Seconds per round and peak memory of every federated algorithm, against central Keras.

For each algorithm (FedAvg, FedRecon with gradient and closed-form
reconstruction, DP-FedAvg, DP-FedRecon) one process runs a warm-up round,
then timed rounds with every ML-100K user as a client, and a central Keras
pass over exactly the same per-client work in the same process, under the
same load:

* FedAvg / DP-FedAvg: `Model.fit` over the clients' own batches, in client
  order (same model, batch size, optimizer steps). DP adds clipping and noise
  on the server side only; the client work, and so the central pass, is
  FedAvg's (DP-FedAvg trains the shared-user-row model, since a user table
  is refused under DP).
* FedRecon / DP-FedRecon: `Model.fit` of a Keras model whose `train_step`
  (`CentralFedRecon`) does, batch by batch, what each client does: rebuild
  the one on-device user row on the user's reconstruction batches (from its
  initial value by reconstruction-optimizer steps, or by accumulating and
  solving the normal equations for the closed form), then train the
  item-side variables on the user's batches with the client optimizer.

Each result has `<algorithm>_round_over_central` (federated round seconds /
central seconds). Peak RSS covers this process and TFF's worker_binary.
The ML-1M scenario runs one round of all 6040 users per algorithm and
records the peak RSS only. A last scenario times the same FedRecon round on
two loopback TFF workers (`--workers`) against one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import statistics
import tempfile
import time
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import common
from benchmarks import federated_speed
from privacy import dp_aggregators
from tff_rec import runtime
from tff_rec.data import federated
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import fed_recon
from tff_rec.training import model_fns
from tff_rec.training import optimizers

NAME = 'algorithm_speed'


@dataclasses.dataclass(frozen=True)
class Setup:
  """Model and training hyperparameters (those of `make run`, gradient recon as in its old config)."""

  batch_size: int = 32
  embedding_dim: int = 32
  l2: float = 0.1
  client_learning_rate: float = 0.1
  server_learning_rate: float = 1.0
  reconstruction_learning_rate: float = 0.2
  recon_epochs: int = 5
  dp_noise_multiplier: float = 1.0
  dp_clip: float = 0.5
  clients_per_subround: int = 500
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  algorithm: str  # algorithms.ALGORITHMS
  user_embedding: str  # model_fns.UserEmbedding value
  reconstruction: str = 'gradient'
  dp: bool = False


ALGORITHMS = (
    Algorithm('fedavg', 'fedavg', 'table'),
    Algorithm('fedrecon', 'fedrecon', 'local'),  # gradient reconstruction (the default)
    Algorithm('fedrecon_closed_form', 'fedrecon', 'local', reconstruction='closed_form'),
    Algorithm('dp_fedavg', 'fedavg', 'shared', dp=True),
    Algorithm('dp_fedrecon', 'fedrecon', 'local', dp=True),
)
BY_NAME = {a.name: a for a in ALGORITHMS}


def model_spec(r: ratings_lib.Ratings, setup: Setup) -> model_fns.ModelSpec:
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', embedding_dim=setup.embedding_dim,
                                l2=setup.l2, init_stddev=0.1, global_mean=float(r.global_mean())),
      num_users=r.num_users, num_items=r.num_items, task='rating', seed=setup.seed, name='mf')


def _sgd(lr: float) -> optimizers.OptimizerConfig:
  return optimizers.OptimizerConfig('sgd', lr)


def build_process(algo: Algorithm, spec: model_fns.ModelSpec, setup: Setup, clients: int):
  """The algorithm's learning process on `spec`."""
  config = algorithms.AlgorithmConfig(
      name=algo.algorithm,
      weighting='uniform' if algo.dp else 'num_examples',
      client_optimizer=_sgd(setup.client_learning_rate),
      server_optimizer=_sgd(setup.server_learning_rate),
      reconstruction_optimizer=_sgd(setup.reconstruction_learning_rate),
      recon_epochs=setup.recon_epochs,
      reconstruction=algo.reconstruction,
      row_sparse_mean=not algo.dp,
  )
  aggregator = None
  if algo.dp:
    aggregator = dp_aggregators.build_aggregator(
        dp_aggregators.DpConfig(mode='gaussian_fixed', noise_multiplier=setup.dp_noise_multiplier,
                                clip=setup.dp_clip), clients)
  return algorithms.build_process(config, spec, model_fns.UserEmbedding(algo.user_embedding),
                                  aggregator)


class FederatedRunner:
  """One algorithm composed with worker-side datasets (one file per user)."""

  def __init__(self, r: ratings_lib.Ratings, algo: Algorithm, setup: Setup, storage_dir: str,
               clients: int):
    spec = model_spec(r, setup)
    self.process = build_process(algo, spec, setup, clients)
    data = federated.client_data(r, federated.ClientDatasetConfig(batch_size=setup.batch_size,
                                                                  seed=setup.seed),
                                 storage_dir=storage_dir)
    self.composed = tff.simulation.compose_dataset_computation_with_learning_process(
        data.dataset_computation, self.process)
    self.state = self.composed.initialize()

  def round(self, client_ids: Sequence[str]):
    out = self.composed.next(self.state, list(client_ids))
    self.state = out.state
    return out.metrics


class CentralFedRecon(tf.keras.Model):
  """FedRecon's per-client work as one Keras pass (see the module docstring).

  Trained with `fit` on batches tagged by phase: `x['phase']` is 0 for a
  reconstruction batch and 1 for a training batch, `x['first']` marks the
  first batch of a user's phase. The wrapped model is the on-device one (one
  user row), as on a client.
  """

  def __init__(self, spec: model_fns.ModelSpec, setup: Setup, reconstruction: str):
    super().__init__()
    self._rec = spec.build(model_fns.UserEmbedding.LOCAL)
    self._local = [v for v in self._rec.local_variables if v.trainable]
    self._global = [v for v in self._rec.global_variables if v.trainable]
    self._initial = [tf.constant(v.numpy()) for v in self._local]
    self._closed_form = reconstruction == 'closed_form'
    self._ridge = model_fns.closed_form_ridge(spec) if self._closed_form else None
    self._recon_opt = tf.keras.optimizers.SGD(setup.reconstruction_learning_rate)
    self._client_opt = tf.keras.optimizers.SGD(setup.client_learning_rate)
    self._loss = tf.keras.losses.MeanSquaredError()
    dim = sum(int(v.shape.num_elements()) for v in self._local)
    self._gram = tf.Variable(tf.zeros([dim, dim], tf.float64), trainable=False)
    self._rhs = tf.Variable(tf.zeros([dim], tf.float64), trainable=False)
    self._count = tf.Variable(0, trainable=False)
    self._recon_opt.build(self._local)
    self._client_opt.build(self._global)

  def _inputs(self, x):
    return collections.OrderedDict(user=x['user'], item=x['item'])

  def _gradient_step(self, variables, optimizer, x, y):
    with tf.GradientTape() as tape:
      loss = self._loss(y, self._rec.keras_model(self._inputs(x), training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  def _reset_reconstruction(self):
    if self._closed_form:
      for v in self._local:
        v.assign(tf.zeros_like(v))
      self._gram.assign(tf.zeros_like(self._gram))
      self._rhs.assign(tf.zeros_like(self._rhs))
      self._count.assign(0)
    else:
      for v, init in zip(self._local, self._initial):
        v.assign(init)
    return tf.constant(True)

  def _reconstruct(self, x, y, first):
    tf.cond(first, self._reset_reconstruction, lambda: tf.constant(False))
    if self._closed_form:
      d_gram, d_rhs = fed_recon.normal_equation_terms(
          lambda: self._rec.keras_model(self._inputs(x), training=True), self._local, y)
      self._gram.assign_add(d_gram)
      self._rhs.assign_add(d_rhs)
      self._count.assign_add(1)
      return tf.constant(0.0)
    return self._gradient_step(self._local, self._recon_opt, x, y)

  def _solve(self):
    fed_recon.solve_normal_equations(self._gram, self._rhs, self._count, self._ridge, self._local)
    return tf.constant(True)

  def _train(self, x, y, first):
    if self._closed_form:
      tf.cond(first, self._solve, lambda: tf.constant(False))
    return self._gradient_step(self._global, self._client_opt, x, y)

  def train_step(self, data):
    x, y = data
    first = x['first'][0]
    loss = tf.cond(tf.equal(x['phase'][0], 0), lambda: self._reconstruct(x, y, first),
                   lambda: self._train(x, y, first))
    return {'loss': loss}


def _tagged_batches(r: ratings_lib.Ratings, client_ids: Sequence[str], setup: Setup,
                    recon_epochs: int) -> tf.data.Dataset:
  """Per client, in order: its batches `recon_epochs` times (phase 0), then once (phase 1)."""
  dataset_fn = federated.make_dataset_fn(r, federated.ClientDatasetConfig(
      batch_size=setup.batch_size, seed=setup.seed))

  def tag(batch, phase, first):
    n = tf.shape(batch['y'])[0]
    x = collections.OrderedDict(batch['x'], phase=tf.fill([n], phase), first=tf.fill([n], first))
    return x, batch['y']

  def client(cid):
    ds = dataset_fn(cid)
    recon = ds.repeat(recon_epochs).enumerate().map(lambda i, b: tag(b, 0, tf.equal(i, 0)))
    train = ds.enumerate().map(lambda i, b: tag(b, 1, tf.equal(i, 0)))
    return recon.concatenate(train)

  return tf.data.Dataset.from_tensor_slices(tf.constant(list(client_ids))).flat_map(client)


class CentralRunner:
  """The central Keras pass of one algorithm over given clients' work."""

  def __init__(self, r: ratings_lib.Ratings, algo: Algorithm, setup: Setup):
    self._r = r
    self._algo = algo
    self._setup = setup
    spec = model_spec(r, setup)
    if algo.algorithm == 'fedrecon':
      self.model = CentralFedRecon(spec, setup, algo.reconstruction)
      self.model.compile()
      # Closed form reads the reconstruction batches once (as the client does).
      self._recon_epochs = 1 if algo.reconstruction == 'closed_form' else setup.recon_epochs
    else:
      self.model = spec.build(model_fns.UserEmbedding(algo.user_embedding)).keras_model
      self.model.compile(optimizer=tf.keras.optimizers.SGD(setup.client_learning_rate),
                         loss=model_fns.loss_fn(spec.task)())
      self._dataset_fn = federated.make_dataset_fn(
          r, federated.ClientDatasetConfig(batch_size=setup.batch_size, seed=setup.seed))

  def dataset(self, client_ids: Sequence[str]) -> tf.data.Dataset:
    if self._algo.algorithm == 'fedrecon':
      return _tagged_batches(self._r, client_ids, self._setup, self._recon_epochs)
    ids = tf.data.Dataset.from_tensor_slices(tf.constant(list(client_ids)))
    return ids.flat_map(self._dataset_fn).map(lambda e: (e['x'], e['y']))

  def epoch(self, client_ids: Sequence[str]) -> dict:
    ds = self.dataset(client_ids)
    seconds, history = common.timed(self.model.fit, ds, epochs=1, verbose=0)
    return {'seconds': seconds, 'loss': float(history.history['loss'][-1])}


def _all_clients(r: ratings_lib.Ratings, round_num: int) -> list[str]:
  return [federated.client_id(u, round_num) for u in r.present_users()]


def measure(r: ratings_lib.Ratings, algo: Algorithm, setup: Setup, storage_dir: str,
            timed_rounds: int, with_central: bool = True, workers: Sequence[str] = ()) -> dict:
  """One algorithm: warm-up round, timed rounds, then the central pass over the same clients."""
  worker = None
  if workers:
    runtime.set_remote_context(list(workers), clients_per_subround=setup.clients_per_subround)
  else:
    worker = runtime.set_local_context(clients_per_subround=setup.clients_per_subround)
  clients = len(r.present_users())
  started = time.perf_counter()
  runner = FederatedRunner(r, algo, setup, storage_dir, clients)
  build_seconds = time.perf_counter() - started
  warmup_seconds, _ = common.timed(runner.round, _all_clients(r, 1))
  worker_pids = [worker.worker_pid] if worker is not None else []
  times = []
  with common.PeakMemory(worker_pids) as memory:
    for k in range(timed_rounds):
      seconds, metrics = common.timed(runner.round, _all_clients(r, 2 + k))
      times.append(seconds)
  row = {
      'algorithm': algo.name,
      'clients': clients,
      'round_seconds': statistics.median(times),
      'round_seconds_all': times,
      'warmup_round_seconds': warmup_seconds,
      'build_seconds': build_seconds,
      'train_loss': float(metrics['client_work']['train']['loss']),
      **memory.result,
  }
  if with_central:
    central = CentralRunner(r, algo, setup)
    central.epoch(_all_clients(r, 1))  # Warm-up (tracing).
    central_times = [central.epoch(_all_clients(r, 2 + k))['seconds'] for k in range(timed_rounds)]
    row['central_seconds'] = statistics.median(central_times)
    row['central_seconds_all'] = central_times
    row[f'{algo.name}_round_over_central'] = row['round_seconds'] / row['central_seconds']
  logging.info('%s', {k: v for k, v in row.items() if not k.endswith('_all')})
  runtime.stop_all_workers()
  return row


def _isolated(fn, *args, **kwargs):
  """`fn(*args, **kwargs)` in a fresh Python process (its own TFF worker): clean memory peaks."""
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=1, mp_context=multiprocessing.get_context('spawn')) as pool:
    return pool.submit(fn, *args, **kwargs).result()


def _measure_remote(r, algo: Algorithm, setup: Setup, storage_dir: str, timed_rounds: int,
                    count: int) -> dict:
  """`measure` on `count` fresh loopback TFF workers."""
  workers, addresses = _start_workers(count)
  try:
    row = measure(r, algo, setup, storage_dir, timed_rounds, with_central=False, workers=addresses)
  finally:
    for w in workers:
      w.stop()
  return dict(row, workers=count)


def _start_workers(count: int) -> tuple[list, list[str]]:
  # Plain TCP workers, as remote ones are (`--workers`).
  workers = [runtime.LocalWorker(isolate=False).start() for _ in range(count)]
  return workers, [w.address for w in workers]


def run(out_dir: str, smoke: bool = False, data_dir: Optional[str] = None,
        only_algorithms: Sequence[str] = (), only_scenarios: Sequence[str] = ()) -> str:
  """Runs the scenarios; writes algorithm_speed.json/.md in `out_dir`; the JSON path."""
  started = time.time()
  setup = Setup(recon_epochs=2, clients_per_subround=50) if smoke else Setup()
  algos = [a for a in ALGORITHMS if not only_algorithms or a.name in only_algorithms]
  small = 'synthetic' if smoke else 'ml-100k'
  large = 'synthetic' if smoke else 'ml-1m'
  timed_rounds = 1 if smoke else 2
  results = collections.OrderedDict()
  want = lambda name: not only_scenarios or name in only_scenarios  # pylint: disable=unnecessary-lambda-assignment
  with tempfile.TemporaryDirectory(prefix='tff_rec_shards_') as storage_dir:
    # Every measurement in its own process, so that peak RSS is its own
    # (the smoke run stays in this one: it only checks that all of it runs).
    call = (lambda fn, *a, **k: fn(*a, **k)) if smoke else _isolated
    if want('all_users'):
      r = federated_speed.load(small, data_dir)
      rows = [call(measure, r, a, setup, storage_dir, timed_rounds) for a in algos]
      results['all_users'] = {'dataset': small, 'users': int(len(r.present_users())),
                              'ratings': int(r.num_ratings), 'rows': rows,
                              'ratios': {k: v for row in rows for k, v in row.items()
                                         if k.endswith('_round_over_central')}}
    if want('all_users_large'):
      r = federated_speed.load(large, data_dir)
      rows = [call(measure, r, a, setup, storage_dir, 1, with_central=False) for a in algos]
      results['all_users_large'] = {'dataset': large, 'users': int(len(r.present_users())),
                                    'ratings': int(r.num_ratings), 'rows': rows}
    if want('remote_workers'):
      r = federated_speed.load(small, data_dir)
      algo = BY_NAME['fedrecon_closed_form']
      rows = [call(_measure_remote, r, algo, setup, storage_dir, timed_rounds, count)
              for count in (1, 2)]
      results['remote_workers'] = {
          'dataset': small, 'algorithm': algo.name, 'rows': rows,
          'two_over_one': rows[1]['round_seconds'] / rows[0]['round_seconds']}
  parameters = {
      'setup': dataclasses.asdict(setup),
      'algorithms': [dataclasses.asdict(a) for a in algos],
      'model': 'biased MF (mf), dim 32, L2 0.1, rating task (MSE)',
      'clients': 'every user of the data set in every round',
      'smoke': smoke,
      'timing': 'median of timed rounds after one warm-up round; central: median of Keras '
                'passes over the same clients\' work after a warm-up pass',
  }
  return common.write_result(out_dir, NAME, parameters, results, summary(results), started)


def summary(results: dict) -> str:
  """The Markdown summary."""
  lines = ['# Seconds per round of each federated algorithm vs a central Keras pass', '',
           common.machine_line(), '']
  if 'all_users' in results:
    res = results['all_users']
    rows = [dict(row, ratio=row.get(f'{row["algorithm"]}_round_over_central')) for row in res['rows']]
    lines += [f'## All {res["users"]} users per round ({res["dataset"]})', '',
              common.markdown_table(rows, ['algorithm', 'round_seconds', 'central_seconds', 'ratio',
                                           'peak_rss_python_gib', 'peak_rss_worker_gib',
                                           'peak_rss_total_gib']), '']
  if 'all_users_large' in results:
    res = results['all_users_large']
    lines += [f'## All {res["users"]} users in one round ({res["dataset"]})', '',
              common.markdown_table(res['rows'], ['algorithm', 'round_seconds', 'peak_rss_python_gib',
                                                  'peak_rss_worker_gib', 'peak_rss_total_gib']), '']
  if 'remote_workers' in results:
    res = results['remote_workers']
    lines += [f'## Loopback TFF workers ({res["algorithm"]}, {res["dataset"]})', '',
              common.markdown_table(res['rows'], ['workers', 'round_seconds']), '',
              f'2 workers / 1 worker: {res["two_over_one"]:.3g}', '']
  return '\n'.join(lines)
