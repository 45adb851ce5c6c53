"""SecAgg / SecAgg+ (privacy/secagg.py): exact sums, dropouts, uniform masks, threshold secrecy."""

import sys

import numpy as np
import pytest
from scipy import stats

from privacy import secagg


def _inputs(n, length, bits, seed=0):
  rng = np.random.default_rng(seed)
  return {u: rng.integers(0, 2 ** min(bits, 62), length, dtype=np.uint64) for u in range(n)}


def _plain_sum(inputs, clients, bits):
  out = np.zeros(len(next(iter(inputs.values()))), dtype=object)
  for u in clients:
    out = out + inputs[u].astype(object)
  return np.array([int(v) % (1 << bits) for v in out], np.uint64)


@pytest.mark.parametrize('graph, degree, bits', [('complete', None, 16), ('complete', None, 64),
                                                  ('harary', 4, 20)])
def test_the_unmasked_sum_equals_the_plain_sum(graph, degree, bits):
  inputs = _inputs(9, 50, bits)
  threshold = 5 if graph == 'complete' else 3
  result = secagg.run_protocol(inputs, bits=bits, threshold=threshold, graph=graph, degree=degree,
                               graph_seed=1)
  np.testing.assert_array_equal(result.total, _plain_sum(inputs, range(9), bits))
  assert result.survivors == frozenset(range(9))
  assert result.upload_bytes > 50 * bits // 8 and result.message_rounds == 4


@pytest.mark.parametrize('n, graph, degree, threshold', [(12, 'complete', None, 7),
                                                         (30, 'harary', 10, 6)])
def test_dropouts_in_every_round_leave_the_exact_sum_of_the_survivors(n, graph, degree, threshold):
  inputs = _inputs(n, 30, 32, seed=1)
  drops = ((0,), (1,), (2, 3), (4,))  # before keys, before shares, before the masked input, at the end
  result = secagg.run_protocol(inputs, bits=32, threshold=threshold, graph=graph, degree=degree,
                               drop_after=drops, graph_seed=3)
  # Clients 0 and 1 never took part; 2 and 3 shared keys but sent no input (their pairwise masks
  # are recovered); 4 sent its input but not its shares in the last round. With degree 10 (11
  # with itself) any neighbourhood keeps at least 6 = t answering clients.
  survivors = set(range(n)) - {0, 1, 2, 3}
  assert result.survivors == frozenset(survivors)
  np.testing.assert_array_equal(result.total, _plain_sum(inputs, survivors, 32))


def test_too_many_dropouts_fail_clearly():
  inputs = _inputs(6, 10, 16)
  with pytest.raises(secagg.SecAggError, match='t=4'):
    secagg.run_protocol(inputs, bits=16, threshold=4, drop_after=((), (), (0, 1, 2), ()))
  # Enough masked inputs, but too few clients answer the unmasking round.
  with pytest.raises(secagg.SecAggError, match='t=4'):
    secagg.run_protocol(inputs, bits=16, threshold=4, drop_after=((), (), (), (0, 1, 2)))


def test_a_masked_vector_looks_uniform():
  """One client's masked input is indistinguishable from uniform, though its input is constant."""
  n, length, bits = 4, 20000, 8
  inputs = {u: np.full(length, 7, np.uint64) for u in range(n)}
  graph = secagg.neighbours(n, 'complete')
  clients = {u: secagg.Client(u, inputs[u], bits=bits) for u in range(n)}
  keys = {u: c.advertise_keys() for u, c in clients.items()}
  sent = {u: clients[u].share_keys({v: keys[v] for v in graph[u]}, 3) for u in range(n)}
  inbox = {v: {u: sent[u][v] for u in range(n)} for v in range(n)}
  y = clients[0].masked_input(inbox[0])
  counts = np.bincount(y.astype(np.int64), minlength=256)
  assert stats.chisquare(counts).pvalue > 1e-6
  assert stats.chisquare(np.bincount(inputs[0].astype(np.int64), minlength=256)).pvalue < 1e-6


def test_fewer_than_t_shares_reveal_nothing():
  shares = secagg.shamir_split(123456789, list(range(5)), 3)
  assert secagg.shamir_reconstruct(shares, 3) == 123456789
  assert secagg.shamir_reconstruct(dict(list(shares.items())[2:]), 3) == 123456789
  with pytest.raises(secagg.SecAggError, match='2 shares, 3 needed'):
    secagg.shamir_reconstruct(dict(list(shares.items())[:2]), 3)
  # Perfect secrecy, checked in a small field: the joint distribution of t-1 = 2 shares is the
  # same (uniform over the 17^2 pairs) whatever the secret.
  prime, trials = 17, 20000
  for s in (0, 9):
    pairs = [tuple(secagg.shamir_split(s, [0, 1, 2], 3, prime=prime)[h] for h in (0, 1))
             for _ in range(trials)]
    counts = np.bincount([a * prime + b for a, b in pairs], minlength=prime * prime)
    assert stats.chisquare(counts).pvalue > 1e-6


def test_a_tampered_share_is_refused():
  inputs = _inputs(3, 4, 8)
  clients = {u: secagg.Client(u, inputs[u], bits=8) for u in range(3)}
  keys = {u: c.advertise_keys() for u, c in clients.items()}
  sent = {u: clients[u].share_keys(keys, 2) for u in range(3)}
  inbox = {u: sent[u][0] for u in range(3)}
  inbox[1] = inbox[1][:-1] + bytes([inbox[1][-1] ^ 1])
  with pytest.raises(secagg.SecAggError, match='the share from 1 fails authentication'):
    clients[0].masked_input(inbox)


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
  inputs = _inputs(3, 4, 8)
  clients = {u: secagg.Client(u, inputs[u], bits=8) for u in range(3)}
  keys = {u: c.advertise_keys() for u, c in clients.items()}
  sent = {u: clients[u].share_keys(keys, 2) for u in range(3)}
  clients[0].masked_input({u: sent[u][0] for u in range(3)})
  with pytest.raises(secagg.SecAggError, match='both secrets'):
    clients[0].unmask(frozenset({0, 1, 2}), frozenset({1}))
  with pytest.raises(secagg.SecAggError, match='t=2'):
    clients[0].unmask(frozenset({0}), frozenset({1, 2}))


def test_harary_graph_is_regular_and_symmetric():
  g = secagg.neighbours(20, 'harary', 6, seed=0)
  assert all(len(g[u]) == 7 and u in g[u] for u in g)
  assert all(u in g[v] for u in g for v in g[u])
  with pytest.raises(ValueError, match='even degree'):
    secagg.neighbours(20, 'harary', 5)


def test_bad_threshold_is_a_clear_error():
  with pytest.raises(ValueError, match='threshold must be in'):
    secagg.run_protocol(_inputs(6, 3, 8), bits=8, threshold=3)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
