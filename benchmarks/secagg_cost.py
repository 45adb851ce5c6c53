"""Cost of secure aggregation and HE against a plain sum, on ML-100K-sized updates; a training run.

The vector each client aggregates is the update a FedRecon client uploads:
the model's global (item-side) trainable variables, built for ML-100K's 943
users x 1682 items (biased MF dim 32; NeuMF with 8 GMF factors and an MLP
32-16-8). The cost depends only on the vector's length and bit width, so
the values are random in Z_{2^20} (20 bits: the distributed-DP default,
`--ddp_bits`) and no data is read. For 100 and 943 clients:

- plain sum: clients send their vector, the server adds them (what TFF's
  simulated `federated_secure_sum_bitwidth` does);
- SecAgg: complete graph, t = ceil(2n/3) (Bonawitz et al.'s choice);
- SecAgg+: random Harary graph of even degree near 3 log2 n, t = 2/3 of a
  neighbourhood, rounded up;
- HE: BFV encryption under a key holder's public key, the server adds
  ciphertexts, the key holder decrypts the sum (privacy/he_aggregation.py).

Each protocol run drops 5% of the clients after they shared their keys and
before they send their masked input, so the server's recovery of their
pairwise masks is part of the cost. Reported: mean CPU seconds per client
(all four rounds), server CPU seconds, mean bytes a client uploads, message
rounds, the share of a neighbourhood that may drop (1 - t / size), and that
the result equals the plain sum of the survivors exactly.

Then training: DP-FedRecon with distributed DP on ML-100K (the settings of
experiments/flags/ml100k_fedrecon_mf.cfg, uniform weighting, 100 clients a
round) through the `run_federated` binary once per `--secure_aggregation`
mode, with `--secagg_verify`: every round, the driver checks that the
protocol's sum is identical to the plain sum of the same client messages,
so the model each round is the one TFF's plain-sum intrinsic would give.
(The runs differ from each other only by their fresh DP noise draws.)
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from benchmarks import common
from privacy import he_aggregation
from privacy import secagg
from tff_rec.models import registry

NAME = 'secagg_cost'
BITS = 20
ML100K = (943, 1682)
MODELS = {
    'mf': dict(embedding_dim=32),
    'neumf': dict(factors=8, layers=[64, 32, 16, 8]),
}


def update_length(model: str, num_users: int, num_items: int) -> int:
  """Number of values in the model's global (item-side) trainable variables."""
  rec = registry.build_model(model, num_users, num_items, personal=True, **MODELS[model])
  return int(sum(np.prod(v.shape) for v in rec.global_variables if v.trainable))


def _methods(n: int) -> list[tuple[str, str, int, int]]:
  """(name, graph, degree or 0, threshold)."""
  degree = secagg.harary_degree(n)
  return [('secagg', 'complete', 0, math.ceil(2 * n / 3)),
          ('secagg+', 'harary', degree, math.ceil(2 * (degree + 1) / 3))]


def _plain(inputs: dict) -> tuple[dict, np.ndarray]:
  mask = np.uint64((1 << BITS) - 1)
  start = time.process_time()
  total = np.zeros_like(next(iter(inputs.values())))
  for x in inputs.values():
    total = total + x
  total &= mask
  server = time.process_time() - start
  length = total.size
  return {'method': 'plain sum', 'client_cpu_s': 0.0, 'server_cpu_s': server,
          'upload_bytes': length * BITS / 8, 'message_rounds': 1, 'tolerated_dropout': 1.0,
          'exact': True}, total


TRAINING_MODES = ('none', 'secagg_plus', 'secagg', 'he')
TRAINING_FLAGS = ('--flagfile=experiments/flags/ml100k_fedrecon_mf.cfg', '--weighting=uniform',
                  '--dp=ddp', '--dp_noise_multiplier=1.0', '--sampling=fixed_size',
                  '--clients_per_round=100', '--total_rounds=10', '--eval_every=10',
                  '--checkpoint_every=10')
SMOKE_FLAGS = ('--dataset=synthetic', '--model=mf', '--embedding_dim=4', '--algorithm=fedrecon',
               '--weighting=uniform', '--dp=ddp', '--dp_noise_multiplier=0.5',
               '--sampling=fixed_size', '--clients_per_round=8', '--total_rounds=2',
               '--eval_every=2')


def _training(mode: str, smoke: bool, data_dir: Optional[str], root: str) -> dict:
  """One DP-FedRecon ddp run under `mode`; its RMSE, time and per-round protocol metrics."""
  argv = [sys.executable, '-m', 'experiments.run_federated', *(SMOKE_FLAGS if smoke
                                                                else TRAINING_FLAGS),
          f'--root_output_dir={root}', f'--experiment_name={mode}', '--noprogress_bar']
  if data_dir and not smoke:
    argv.append(f'--data_dir={data_dir}')
  if mode != 'none':
    argv += [f'--secure_aggregation={mode}', '--secagg_verify']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  wall = time.perf_counter()
  proc = subprocess.run(argv, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        env=env, capture_output=True, text=True)
  wall = time.perf_counter() - wall
  if proc.returncode:
    raise RuntimeError(f'training under --secure_aggregation={mode} failed:\n{proc.stderr[-3000:]}')
  run_dir = os.path.join(root, mode)
  with open(os.path.join(run_dir, 'test_metrics.json')) as f:
    test = json.load(f)
  with open(os.path.join(run_dir, 'metrics.csv')) as f:
    rounds = [r for r in csv.DictReader(f) if r.get('client_work/train/loss')]
  row = {'mode': mode, 'rounds': len(rounds), 'test_rmse': float(test['rmse']), 'wall_s': wall}
  if mode != 'none':
    key = 'secure_aggregation/'
    row.update(
        exact_rounds=sum(int(r[key + 'exact_checked']) for r in rounds),
        clients=int(rounds[-1][key + 'clients']), bits=int(rounds[-1][key + 'bits']),
        client_cpu_s=float(np.mean([float(r[key + 'client_cpu_s']) for r in rounds])),
        server_cpu_s=float(np.mean([float(r[key + 'server_cpu_s']) for r in rounds])),
        upload_bytes=float(np.mean([float(r[key + 'upload_bytes']) for r in rounds])))
    if row['exact_rounds'] != row['rounds']:
      raise RuntimeError(f'{mode}: only {row["exact_rounds"]} of {row["rounds"]} rounds verified')
  return row


def _he(inputs: dict, dropped: tuple) -> tuple[dict, he_aggregation.HeResult]:
  wall = time.perf_counter()
  result = he_aggregation.run_protocol(inputs, bits=BITS, dropped=dropped)
  return {'method': 'he (bfv)', 'client_cpu_s': result.client_seconds,
          'server_cpu_s': result.server_seconds, 'keyholder_cpu_s': result.keyholder_seconds,
          'upload_bytes': result.upload_bytes, 'message_rounds': result.message_rounds,
          'tolerated_dropout': 1.0, 'wall_s': time.perf_counter() - wall}, result


def run(out_dir: str, smoke: bool = False, data_dir: Optional[str] = None) -> str:
  """Times plain sum, SecAgg, SecAgg+, HE; trains under each; writes secagg_cost.{json,md}."""
  started = time.time()
  sizes = (12, 30) if smoke else (100, 943)
  num_users, num_items = (30, 40) if smoke else ML100K
  rng = np.random.default_rng(0)
  rows = []
  for model in MODELS:
    length = update_length(model, num_users, num_items)
    for n in sizes:
      inputs = {u: rng.integers(0, 1 << BITS, length, dtype=np.uint64) for u in range(n)}
      dropped = tuple(range(0, n, 20))  # 5% drop before the masked-input round
      row, _ = _plain(inputs)
      rows.append(dict(row, model=model, length=length, clients=n))
      survivors = [u for u in range(n) if u not in dropped]
      expected = np.zeros(length, np.uint64)
      for u in survivors:
        expected = expected + inputs[u]
      expected &= np.uint64((1 << BITS) - 1)
      for name, graph, degree, threshold in _methods(n):
        wall = time.perf_counter()
        result = secagg.run_protocol(inputs, bits=BITS, threshold=threshold, graph=graph,
                                     degree=degree or None, drop_after=((), (), dropped, ()),
                                     graph_seed=0)
        size = n if graph == 'complete' else degree + 1
        rows.append({'method': name, 'model': model, 'length': length, 'clients': n,
                     'degree': size - 1, 'threshold': threshold,
                     'client_cpu_s': result.client_seconds, 'server_cpu_s': result.server_seconds,
                     'upload_bytes': result.upload_bytes, 'message_rounds': result.message_rounds,
                     'tolerated_dropout': 1 - threshold / size,
                     'wall_s': time.perf_counter() - wall,
                     'exact': bool(np.array_equal(result.total, expected))})
      row, result = _he(inputs, dropped)
      rows.append(dict(row, model=model, length=length, clients=n,
                       exact=bool(np.array_equal(result.total, expected))))
  if not all(r['exact'] for r in rows):
    raise RuntimeError('a secure sum differed from the plain sum: ' +
                       str([r for r in rows if not r['exact']]))
  with tempfile.TemporaryDirectory() as root:
    training = [_training(mode, smoke, data_dir, root) for mode in TRAINING_MODES]
  parameters = {'bits': BITS, 'users_items': [num_users, num_items], 'models': MODELS,
                'clients': list(sizes), 'dropout_before_masked_input': 0.05, 'smoke': smoke,
                'training_flags': list(SMOKE_FLAGS if smoke else TRAINING_FLAGS)}
  md = '\n'.join([
      f'# Secure aggregation cost ({BITS}-bit vectors, {num_users} users x {num_items} items)', '',
      common.machine_line(), '',
      common.markdown_table(rows, ['model', 'length', 'clients', 'method', 'degree', 'threshold',
                                   'client_cpu_s', 'server_cpu_s', 'keyholder_cpu_s',
                                   'upload_bytes', 'message_rounds', 'tolerated_dropout',
                                   'exact']), '',
      '## Training: DP-FedRecon with distributed DP, each --secure_aggregation mode', '',
      ' '.join(SMOKE_FLAGS if smoke else TRAINING_FLAGS), '',
      common.markdown_table(training, ['mode', 'rounds', 'exact_rounds', 'clients', 'bits',
                                       'client_cpu_s', 'server_cpu_s', 'upload_bytes',
                                       'test_rmse', 'wall_s']), ''])
  return common.write_result(out_dir, NAME, parameters, {'rows': rows, 'training': training},
                             md, started)
