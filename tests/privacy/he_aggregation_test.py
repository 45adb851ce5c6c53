"""BFV aggregation (privacy/he_aggregation.py): exact sums, keys where they belong, clear errors."""

import sys

import numpy as np
import pytest
import tenseal as ts

from privacy import he_aggregation as he
from tests.privacy.secagg_test import _plain_sum


def _inputs(n, length, bits, seed=0):
  rng = np.random.default_rng(seed)
  return {u: rng.integers(0, 1 << bits, length, dtype=np.uint64) for u in range(n)}


@pytest.mark.parametrize('n, length, bits, dropped', [
    (5, 100, 20, ()),
    (7, he.SLOTS + 37, 16, (2, 5)),  # two ciphertexts, a partly filled one
    (30, 50, 50, (0,)),              # near the 60-bit plaintext limit
])
def test_the_decrypted_sum_equals_the_plain_sum(n, length, bits, dropped):
  inputs = _inputs(n, length, bits)
  result = he.run_protocol(inputs, bits=bits, dropped=dropped)
  survivors = [u for u in range(n) if u not in dropped]
  assert result.survivors == frozenset(survivors)
  np.testing.assert_array_equal(result.total, _plain_sum(inputs, survivors, bits))
  blocks = -(-length // he.SLOTS)
  assert result.upload_bytes > blocks * 100_000  # BFV ciphertexts, not the plain vector
  assert result.client_seconds > 0 and result.server_seconds > 0


def test_the_plaintext_modulus_is_a_batching_prime_above_twice_the_largest_sum():
  for bits, n in ((20, 943), (1, 2), (38, 1000)):
    p = he.plain_modulus(bits, n)
    assert he._is_prime(p) and p % (2 * he.SLOTS) == 1
    assert p > 2 * n * ((1 << bits) - 1)
  assert not he._is_prime(2 ** 61 + 1) and he._is_prime(2 ** 61 - 1)
  with pytest.raises(he.HeError, match='60'):
    he.plain_modulus(56, 1000)


def test_only_the_key_holder_can_decrypt():
  holder = he.KeyHolder(bits=20, num_clients=3)
  public = ts.context_from(holder.public_context)
  assert not public.is_private()
  blob = he.HeClient(holder.public_context).encrypt(np.arange(10, dtype=np.uint64))[0]
  with pytest.raises(ValueError):  # TenSEAL: no secret key in the server's context.
    ts.bfv_vector_from(public, blob).decrypt()
  np.testing.assert_array_equal(holder.decrypt([blob], 10), np.arange(10))


def test_encryption_is_randomized_and_a_client_refuses_the_secret_key():
  holder = he.KeyHolder(bits=20, num_clients=3)
  client = he.HeClient(holder.public_context)
  x = np.ones(20, np.uint64)
  assert client.encrypt(x)[0] != client.encrypt(x)[0]
  with pytest.raises(he.HeError, match='secret key'):
    he.HeClient(holder._context.serialize(save_secret_key=True))


def test_bad_inputs_fail_clearly():
  with pytest.raises(ValueError, match='fit in 8 bits'):
    he.run_protocol({0: np.array([256], np.uint64), 1: np.array([1], np.uint64)}, bits=8)
  with pytest.raises(ValueError, match='one length'):
    he.run_protocol({0: np.zeros(3, np.uint64), 1: np.zeros(4, np.uint64)}, bits=8)
  with pytest.raises(ValueError, match='dropped'):
    he.run_protocol({0: np.zeros(3, np.uint64)}, bits=8, dropped=[0])
  holder = he.KeyHolder(bits=8, num_clients=2)
  server = he.HeServer(holder.public_context)
  with pytest.raises(he.HeError, match='client 1'):
    server.add({0: he.HeClient(holder.public_context).encrypt(np.zeros(3, np.uint64)),
                1: [b'not a ciphertext']})


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
