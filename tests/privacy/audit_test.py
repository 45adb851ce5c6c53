"""Membership-inference audit on per-user losses."""

import sys
import numpy as np
import pytest

from privacy import audit
from tff_rec.data import splits
from tff_rec.data import synthetic


def test_indistinguishable_losses_give_a_finite_auc_near_one_half():
  rng = np.random.default_rng(0)
  result = audit.membership_attack(rng.exponential(1.0, 300), rng.exponential(1.0, 300))
  assert result['num_members'] == result['num_nonmembers'] == 300
  for name in ('threshold', 'logistic_regression'):
    auc = result[name]['auc']
    assert np.isfinite(auc) and 0.0 <= auc <= 1.0
    assert abs(auc - 0.5) < 0.1
    assert 0.0 <= result[name]['advantage'] < 0.2
  assert result['max_auc'] == max(result['threshold']['auc'], result['logistic_regression']['auc'])


def test_separable_losses_give_auc_near_one():
  rng = np.random.default_rng(1)
  members = rng.normal(0.2, 0.05, 200)  # Training users: low loss.
  nonmembers = rng.normal(1.5, 0.05, 200)
  result = audit.membership_attack(members, nonmembers)
  assert result['threshold']['auc'] > 0.99
  assert result['logistic_regression']['auc'] > 0.99
  assert result['max_advantage'] > 0.95


def test_attack_is_reproducible_under_a_seed():
  rng = np.random.default_rng(2)
  a, b = rng.normal(0, 1, 100), rng.normal(0.3, 1, 100)
  assert audit.membership_attack(a, b, seed=3) == audit.membership_attack(a, b, seed=3)


@pytest.mark.parametrize('members, nonmembers, match', [
    ([0.1, 0.2], [0.3] * 10, 'member_losses'),
    ([0.1] * 10, [0.3, np.nan, 0.1, 0.2], 'nonmember_losses'),
])
def test_bad_inputs_are_refused(members, nonmembers, match):
  with pytest.raises(ValueError, match=match):
    audit.membership_attack(members, nonmembers)


def test_per_user_mean_losses_are_exact():
  ratings = synthetic.synthetic_ratings(num_users=12, num_items=8, mean_ratings_per_user=4, seed=4).ratings
  predict = lambda batch: np.full(len(batch['user']), 3.0)  # pylint: disable=g-long-lambda
  users, losses = audit.per_user_mean_losses(predict, ratings, batch_size=7)
  for u, loss in zip(users, losses):
    mine = ratings.ratings[ratings.users == u]
    assert loss == pytest.approx(np.mean((mine - 3.0) ** 2))
  np.testing.assert_array_equal(users, ratings.present_users())


def test_audit_model_on_a_by_user_split():
  data = synthetic.synthetic_ratings(num_users=60, num_items=20, seed=6)
  split = splits.split_by_user(data.ratings, fractions=(0.5, 0.0, 0.5))
  truth = lambda b: data.expected(b['user'], b['item'])  # pylint: disable=g-long-lambda
  result = audit.audit_model(truth, split.train, split.test)
  assert 0.0 <= result['max_auc'] <= 1.0
  with pytest.raises(ValueError, match='by-user split'):
    audit.audit_model(truth, split.train, split.train)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
