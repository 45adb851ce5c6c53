"""Empirical privacy audit: user-level membership inference on per-user losses.

Members are users whose ratings trained the model, non-members are held-out
users (a by-user split). The attack feature of a user is their mean loss over
their ratings, computed with the trained model however the caller sees fit
(for FedRecon, after reconstructing the user's embedding on their own
ratings). TF Privacy's membership inference attacks (tensorflow-empirical-
privacy) then try to tell members from non-members:

* threshold attack: "member if loss <= t", over all t (ROC on -loss);
* logistic regression on the loss, trained and scored with 2-fold
  cross-validation on balanced member / non-member sets.

AUC 0.5 and advantage (max TPR - FPR) 0 mean the attack does no better than
chance. A low AUC is no proof of privacy (other attacks may do better); a
high AUC shows leakage.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import data_structures as mia_data
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import membership_inference_attack as mia

from tff_rec.data import ratings as ratings_lib

ATTACKS = {
    'threshold': mia_data.AttackType.THRESHOLD_ATTACK,
    'logistic_regression': mia_data.AttackType.LOGISTIC_REGRESSION,
}
MIN_USERS = 4  # per side: 2-fold cross-validation needs two of each class per fold.

# (y_true float32[B], y_pred float32[B]) -> per-example loss float[B].
LossFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def squared_error(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
  """Per-example squared error (rating models)."""
  return (np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)) ** 2


def _check_losses(name: str, losses) -> np.ndarray:
  a = np.asarray(losses, dtype=np.float64).reshape(-1)
  if a.size < MIN_USERS:
    raise ValueError(f'{name}: need at least {MIN_USERS} users, got {a.size}')
  if not np.all(np.isfinite(a)):
    raise ValueError(f'{name}: losses must be finite')
  return a


@contextlib.contextmanager
def _numpy_seed(seed: int):
  """TF Privacy's attacks draw from np.random's global state: seed it locally."""
  state = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(state)


def membership_attack(member_losses: Sequence[float], nonmember_losses: Sequence[float],
                      attacks: Sequence[str] = ('threshold', 'logistic_regression'),
                      seed: int = 0) -> dict:
  """Attacker AUC and advantage per attack, and the max over attacks.

  `member_losses[k]` / `nonmember_losses[k]`: one number per user (e.g. the
  user's mean loss). Returns {'num_members', 'num_nonmembers', <attack>:
  {'auc', 'advantage'}, 'max_auc', 'max_advantage'}.
  """
  members = _check_losses('member_losses', member_losses)
  nonmembers = _check_losses('nonmember_losses', nonmember_losses)
  unknown = [a for a in attacks if a not in ATTACKS]
  if unknown or not attacks:
    raise ValueError(f'attacks must be a non-empty subset of {sorted(ATTACKS)}, got {list(attacks)}')
  data = mia_data.AttackInputData(loss_train=members, loss_test=nonmembers)
  out = {'num_members': int(members.size), 'num_nonmembers': int(nonmembers.size)}
  with _numpy_seed(seed):
    results = mia.run_attacks(
        data, mia_data.SlicingSpec(entire_dataset=True),
        attack_types=[ATTACKS[a] for a in attacks])
  by_type = {r.attack_type.name: r for r in results.single_attack_results}
  for name in attacks:
    r = by_type.get(ATTACKS[name].name)
    if r is None:
      raise RuntimeError(f'{name} attack produced no result (too few users?)')
    out[name] = {
        'auc': float(r.get_auc()),
        'advantage': float(r.get_attacker_advantage()),
    }
  out['max_auc'] = max(out[a]['auc'] for a in attacks)
  out['max_advantage'] = max(out[a]['advantage'] for a in attacks)
  return out


def per_user_mean_losses(predict_fn: Callable[[dict], np.ndarray],
                         ratings: ratings_lib.Ratings,
                         loss_fn: LossFn = squared_error,
                         batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """(users, mean loss of each user over their ratings) for users present.

  `predict_fn({'user': int32[B], 'item': int32[B]}) -> float[B]`, e.g. a Keras
  model (see `keras_predict_fn`).
  """
  if ratings.num_ratings == 0:
    raise ValueError(f'{ratings.name}: no ratings')
  preds = []
  for start in range(0, ratings.num_ratings, batch_size):
    stop = start + batch_size
    batch = {'user': ratings.users[start:stop], 'item': ratings.items[start:stop]}
    preds.append(np.asarray(predict_fn(batch)).reshape(-1))
  losses = np.asarray(loss_fn(ratings.ratings, np.concatenate(preds)), np.float64)
  users = ratings.present_users()
  sums = np.bincount(ratings.users, weights=losses, minlength=ratings.num_users)
  counts = np.bincount(ratings.users, minlength=ratings.num_users)
  return users, sums[users] / counts[users]


def keras_predict_fn(model, batch_size: int = 65536) -> Callable[[dict], np.ndarray]:
  """predict_fn of a Keras model over OrderedDict(user, item)."""

  def predict(batch: dict) -> np.ndarray:
    return np.asarray(model.predict(batch, batch_size=batch_size, verbose=0))

  return predict


def audit_model(predict_fn: Callable[[dict], np.ndarray], members: ratings_lib.Ratings,
                nonmembers: ratings_lib.Ratings, loss_fn: LossFn = squared_error,
                seed: int = 0, attacks: Optional[Sequence[str]] = None) -> dict:
  """Membership attack of per-user mean losses: members vs held-out users.

  `members`: ratings of training users; `nonmembers`: ratings of users the
  model never trained on (e.g. `split.train` and `split.test` of a by-user
  split, with a model that does not need the user's row, or whose row the
  caller fills in before predicting).
  """
  overlap = np.intersect1d(members.present_users(), nonmembers.present_users())
  if overlap.size:
    raise ValueError(f'{overlap.size} users are both members and non-members; '
                     'use a by-user split')
  _, member_losses = per_user_mean_losses(predict_fn, members, loss_fn)
  _, nonmember_losses = per_user_mean_losses(predict_fn, nonmembers, loss_fn)
  kwargs = {} if attacks is None else {'attacks': attacks}
  return membership_attack(member_losses, nonmember_losses, seed=seed, **kwargs)
