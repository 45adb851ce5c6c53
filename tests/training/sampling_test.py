"""Seeded client sampling."""

import sys
import numpy as np
import pytest

from tff_rec.training import sampling


def test_fixed_size_is_deterministic_per_round():
  s = sampling.ClientSampler(range(100), 10, seed=3)
  assert s(5) == s(5)
  assert s(5) != s(6)
  assert len(s.users_for_round(5)) == 10
  assert len(set(s.users_for_round(5))) == 10
  assert sampling.ClientSampler(range(100), 10, seed=4)(5) != s(5)


def test_ids_carry_the_round():
  s = sampling.ClientSampler([7, 9], 2, seed=0)
  assert s(3) == ['7:3', '9:3']


def test_all_users_when_clients_equal_population():
  s = sampling.ClientSampler(range(5), 5, seed=0)
  np.testing.assert_array_equal(s.users_for_round(1), np.arange(5))


def test_poisson_rate():
  s = sampling.ClientSampler(range(2000), 200, seed=0, mode='poisson')
  sizes = [len(s.users_for_round(r)) for r in range(50)]
  assert len(set(sizes)) > 1
  assert abs(np.mean(sizes) - 200) < 15


@pytest.mark.parametrize('k', [0, 101])
def test_clients_per_round_bounds(k):
  with pytest.raises(ValueError, match='clients_per_round'):
    sampling.ClientSampler(range(100), k, seed=0)


def test_unknown_mode():
  with pytest.raises(ValueError, match='unknown sampling'):
    sampling.ClientSampler(range(10), 1, seed=0, mode='bogus')


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
