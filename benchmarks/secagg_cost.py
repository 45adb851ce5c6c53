"""Cost of secure aggregation (privacy/secagg.py) against a plain sum, on ML-100K-sized updates.

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
  neighbourhood, rounded up.

Each protocol run drops 5% of the clients after they shared their keys and
before they send their masked input, so the server's recovery of their
pairwise masks is part of the cost. Reported: mean CPU seconds per client
(all four rounds), server CPU seconds, mean bytes a client uploads, message
rounds, the share of a neighbourhood that may drop (1 - t / size), and that
the result equals the plain sum of the survivors exactly.
"""

from __future__ import annotations

import math
import time

import numpy as np

from benchmarks import common
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


def _harary_degree(n: int) -> int:
  degree = 2 * round(1.5 * math.log2(n))
  return min(degree, n - 1 - (n - 1) % 2)


def _methods(n: int) -> list[tuple[str, str, int, int]]:
  """(name, graph, degree or 0, threshold)."""
  degree = _harary_degree(n)
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


def run(out_dir: str, smoke: bool = False) -> str:
  """Times plain sum, SecAgg and SecAgg+; writes secagg_cost.json/.md; the JSON path."""
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
  if not all(r['exact'] for r in rows):
    raise RuntimeError('a secure sum differed from the plain sum: ' +
                       str([r for r in rows if not r['exact']]))
  parameters = {'bits': BITS, 'users_items': [num_users, num_items], 'models': MODELS,
                'clients': list(sizes), 'dropout_before_masked_input': 0.05, 'smoke': smoke}
  md = '\n'.join([
      f'# Secure aggregation cost ({BITS}-bit vectors, {num_users} users x {num_items} items)', '',
      common.machine_line(), '',
      common.markdown_table(rows, ['model', 'length', 'clients', 'method', 'degree', 'threshold',
                                   'client_cpu_s', 'server_cpu_s', 'upload_bytes',
                                   'message_rounds', 'tolerated_dropout', 'exact']), ''])
  return common.write_result(out_dir, NAME, parameters, {'rows': rows}, md, started)
