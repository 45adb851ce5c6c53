"""User-level (epsilon, delta) accounting for DP-FedAvg, DP-FTRL and DP-SGD.

All epsilon math is done by `dp_accounting` 0.4.3 (and, for the CLT estimate,
TF Privacy's `gdp_accountant`); this module only builds the `DpEvent` that
describes a training plan and picks the accountant.

What the guarantee covers. The unit of privacy is one user = one client, i.e.
all of a user's ratings at once. A training run of `rounds` rounds releases the
server model after every round; the (epsilon, delta) bound covers the sequence
of all released server models (hence any post-processing of them), provided
that

* every client's whole model update is clipped to L2 norm `clip`, Gaussian
  noise of std `noise_multiplier * clip` is added to the *sum* of the clipped
  updates by a trusted server, and the sum is divided by a public constant
  (e.g. `tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed`);
* the participating clients are chosen exactly as the plan says, and which
  clients were chosen is not released.

Adjacency (neighbouring datasets) depends on the plan:

* `mechanism='gaussian', sampling='poisson'`: each user is included in a round
  independently with probability q = clients_per_round / population (DP-FedAvg,
  McMahan et al. 2018). Adjacency: add or remove one user
  (`NeighboringRelation.ADD_OR_REMOVE_ONE`); L2 sensitivity of the sum = clip.
  Supported by the RDP and the PLD accountant.
* `mechanism='gaussian', sampling='fixed_size'`: exactly clients_per_round
  distinct users are drawn uniformly without replacement each round.
  Adjacency: replace one user by another (`REPLACE_ONE`; the population size is
  public). Replacing a user moves the sum by up to 2 * clip, so the event is
  built with noise multiplier `noise_multiplier / 2` (dp_accounting's noise
  multiplier is relative to the sensitivity under the chosen relation, the same
  convention as TF Privacy's `used_microbatching` halving). dp_accounting 0.4.3
  supports `SampledWithoutReplacementDpEvent` only in the RDP accountant
  (Wang, Balle, Kasiviswanathan 2019); the PLD accountant raises.
* `mechanism='tree'` (DP-FTRL, Kairouz et al. 2021; TFF
  `DifferentiallyPrivateFactory.tree_aggregation`): no sampling. Training is
  split into epochs of ceil(population / clients_per_round) rounds in which
  each user participates at most once (e.g. shuffle the users each epoch and
  take consecutive blocks). Adjacency: replace one user's data by the special
  zero record (`REPLACE_SPECIAL`, Kairouz et al. Definition 1.1); sensitivity
  of every tree node = clip. RDP accountant only
  (`SingleEpochTreeAggregationDpEvent`). The tree must be restarted at least
  once per epoch, at epoch boundaries (TFF's `tree_aggregation` alone never
  restarts; wrap its query in TF Privacy's `RestartQuery` with a
  `PeriodicRoundRestartIndicator(restart_rounds)`).

Not covered: state a client keeps or releases locally (e.g. its own user
embedding and the recommendations computed from it), weighting by
data-dependent counts, and privacy spent on hyper-parameter search or on
earlier runs over the same users.

Central DP-SGD (`dpsgd_epsilon`) is the same Poisson code path with examples
(or users) in place of clients.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant

NeighboringRelation = dp_accounting.NeighboringRelation

SAMPLINGS = ('poisson', 'fixed_size')
ACCOUNTANTS = ('rdp', 'pld')
MECHANISMS = ('gaussian', 'tree')

# Width of the privacy-loss grid of the PLD accountant. The discretisation is
# pessimistic (an upper bound on epsilon), and 1e-3 instead of the library's
# 1e-4 changes epsilon by < 1e-4 relative on DP-FedAvg/DP-SGD plans (e.g. 16.7055
# vs 16.7052 for Bu et al.'s ML-1M setting) while being 5-10x faster, which
# matters for calibration and binary searches.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3

# Calibration searches the noise multiplier in [1/16, 1024] (by doubling/halving
# from 1.0 to find a bracket), then runs Brent's method to this absolute
# tolerance on the noise multiplier.
CALIBRATION_TOLERANCE = 1e-5
_MIN_NOISE_MULTIPLIER = 1.0 / 16
_MAX_NOISE_MULTIPLIER = 1024.0

# `max_rounds_within` without an upper bound gives up beyond this many rounds.
MAX_SEARCH_ROUNDS = 10**8


class BudgetExceededError(ValueError):
  """The planned run would spend more than the privacy budget."""

  def __init__(self, planned_epsilon: float, target_epsilon: float,
               max_rounds: int, rounds: int):
    self.planned_epsilon = planned_epsilon
    self.target_epsilon = target_epsilon
    self.max_rounds = max_rounds
    self.rounds = rounds
    super().__init__(
        f'privacy budget exceeded: {rounds} rounds give epsilon = '
        f'{planned_epsilon:.6g} > target epsilon = {target_epsilon:.6g}; at most '
        f'{max_rounds} rounds stay within the budget')


class UnsupportedAccountingError(ValueError):
  """The accountant cannot analyse this sampling scheme or mechanism."""


# ---------------------------------------------------------------------------
# Argument checks.


def _check_int(name: str, value: object, minimum: int = 1) -> int:
  """Returns `value` as int; raises ValueError naming `name` if not >= minimum."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


def _check_positive(name: str, value: object) -> float:
  """Returns `value` as float; raises ValueError naming `name` if not > 0."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be a number, got {value!r}')
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value}')
  return float(value)


def _check_delta(delta: object) -> float:
  """Returns `delta` as float; raises ValueError unless 0 < delta < 1."""
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
    raise ValueError(f'delta must be a number, got {delta!r}')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta}')
  return float(delta)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
  """Raises ValueError naming `name` unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f'{name} must be one of {list(choices)}, got {value!r}')
  return value


def epoch_rounds(clients_per_round: int, population: int) -> int:
  """Rounds per epoch in which each user participates at most once."""
  return math.ceil(population / clients_per_round)


def check_restart_rounds(restart_rounds: Optional[int], clients_per_round: int,
                         population: int) -> None:
  """Raises ValueError unless the tree restarts align with epoch boundaries.

  `SingleEpochTreeAggregationDpEvent` needs every user at most once across the
  trees it covers, so each tree must lie inside one epoch: `restart_rounds`
  must divide the epoch length ceil(population / clients_per_round). A tree
  spanning several epochs (including TFF's default of never restarting, when
  training lasts more than one epoch) needs the multi-participation analysis
  with a minimum separation, which dp_accounting 0.4.3 does not offer.
  """
  if restart_rounds is None:
    return
  _check_int('restart_rounds', restart_rounds)
  length = epoch_rounds(clients_per_round, population)
  if length % restart_rounds:
    divisors = [d for d in range(1, length + 1) if length % d == 0]
    shown = divisors if len(divisors) <= 12 else divisors[:6] + ['...'] + divisors[-3:]
    raise ValueError(
        f'restart_rounds ({restart_rounds}) must divide the epoch length '
        f'ceil(population / clients_per_round) = {length} so that no tree '
        f'spans two epochs; allowed: {shown}')


def check_supported(accountant: str, sampling: str = 'poisson',
                    mechanism: str = 'gaussian') -> None:
  """Raises UnsupportedAccountingError if dp_accounting 0.4.3 can't do this."""
  _check_choice('accountant', accountant, ACCOUNTANTS)
  _check_choice('sampling', sampling, SAMPLINGS)
  _check_choice('mechanism', mechanism, MECHANISMS)
  if accountant != 'pld':
    return
  if mechanism == 'tree':
    raise UnsupportedAccountingError(
        "accountant='pld' does not support mechanism='tree': dp_accounting "
        "0.4.3's PLDAccountant has no SingleEpochTreeAggregationDpEvent; use "
        "accountant='rdp'")
  if sampling == 'fixed_size':
    raise UnsupportedAccountingError(
        "accountant='pld' does not support sampling='fixed_size': dp_accounting "
        "0.4.3's PLDAccountant handles only PoissonSampledDpEvent, not "
        "SampledWithoutReplacementDpEvent; use accountant='rdp' or "
        "sampling='poisson'")


def default_delta(population: int) -> float:
  """delta = 1 / population**1.1, the default target delta for a population.

  delta is the probability with which the epsilon guarantee may fail
  outright; a mechanism that publishes one random user's data in full is
  (0, 1/n)-DP, so delta must be well below 1/n to mean anything. The common
  recommendation is delta << 1/n; n**-1.1 is strictly below 1/n for every
  n >= 2, shrinks faster than 1/n as the population grows, and stays
  meaningful for small populations (943 users -> 5.3e-4, 6040 -> 6.9e-5).
  """
  population = _check_int('population', population, minimum=2)
  return 1.0 / population**1.1


# ---------------------------------------------------------------------------
# The plan and its DpEvent.


@dataclasses.dataclass(frozen=True)
class DpPlan:
  """A planned DP training run (see the module docstring for the guarantee).

  Attributes:
    noise_multiplier: noise std / clip norm, per round (per tree node for
      mechanism='tree').
    clients_per_round: clients per round (the expected number for Poisson).
    population: number of users that may be sampled.
    rounds: number of training rounds.
    delta: target delta.
    sampling: 'poisson' or 'fixed_size' (see module docstring); not used by
      mechanism='tree', which assumes epochs of shuffled participation.
    mechanism: 'gaussian' (DP-FedAvg) or 'tree' (DP-FTRL tree aggregation).
    restart_rounds: mechanism='tree' only: restart the tree every this many
      rounds (must divide the epoch length); None restarts once per epoch.
  """

  noise_multiplier: float
  clients_per_round: int
  population: int
  rounds: int
  delta: float
  sampling: str = 'poisson'
  mechanism: str = 'gaussian'
  restart_rounds: Optional[int] = None

  def __post_init__(self):
    _check_positive('noise_multiplier', self.noise_multiplier)
    _check_int('clients_per_round', self.clients_per_round)
    _check_int('population', self.population)
    _check_int('rounds', self.rounds)
    _check_delta(self.delta)
    _check_choice('sampling', self.sampling, SAMPLINGS)
    _check_choice('mechanism', self.mechanism, MECHANISMS)
    if self.clients_per_round > self.population:
      raise ValueError(
          f'clients_per_round ({self.clients_per_round}) must be <= population '
          f'({self.population})')
    if self.restart_rounds is not None and self.mechanism != 'tree':
      raise ValueError("restart_rounds only applies to mechanism='tree'")
    check_restart_rounds(self.restart_rounds, self.clients_per_round,
                         self.population)

  @property
  def sampling_probability(self) -> float:
    """Fraction of the population that takes part in a round."""
    return self.clients_per_round / self.population

  @property
  def epoch_rounds(self) -> int:
    """Rounds per epoch (each user at most once per epoch)."""
    return epoch_rounds(self.clients_per_round, self.population)

  def replace(self, **changes) -> 'DpPlan':
    """A copy of this plan with some fields changed (and re-validated)."""
    return dataclasses.replace(self, **changes)


def neighboring_relation(plan: DpPlan) -> NeighboringRelation:
  """The adjacency under which the plan's guarantee holds."""
  if plan.mechanism == 'tree':
    return NeighboringRelation.REPLACE_SPECIAL
  if plan.sampling == 'fixed_size':
    return NeighboringRelation.REPLACE_ONE
  return NeighboringRelation.ADD_OR_REMOVE_ONE


def round_event(plan: DpPlan) -> dp_accounting.DpEvent:
  """DpEvent of one DP-FedAvg round (mechanism='gaussian' only)."""
  if plan.mechanism != 'gaussian':
    raise ValueError("round_event needs mechanism='gaussian'")
  if plan.sampling == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(
        plan.sampling_probability,
        dp_accounting.GaussianDpEvent(plan.noise_multiplier))
  # Replace-one sensitivity of the clipped sum is 2 * clip.
  return dp_accounting.SampledWithoutReplacementDpEvent(
      plan.population, plan.clients_per_round,
      dp_accounting.GaussianDpEvent(plan.noise_multiplier / 2))


def _trees(rounds: int, restart: int) -> List[int]:
  """Sizes of the trees covering `rounds` rounds, restarting every `restart`."""
  full, rest = divmod(rounds, restart)
  return [restart] * full + ([rest] if rest else [])


def dp_event(plan: DpPlan) -> dp_accounting.DpEvent:
  """DpEvent of the whole planned run."""
  if plan.mechanism == 'gaussian':
    return dp_accounting.SelfComposedDpEvent(round_event(plan), plan.rounds)
  length = plan.epoch_rounds
  restart = plan.restart_rounds or length
  full, rest = divmod(plan.rounds, length)
  events = []
  if full:
    events.append(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SingleEpochTreeAggregationDpEvent(
            plan.noise_multiplier, _trees(length, restart)), full))
  if rest:
    events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(
        plan.noise_multiplier, _trees(rest, restart)))
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def make_accountant(
    accountant: str,
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> dp_accounting.PrivacyAccountant:
  """A fresh privacy accountant.

  Args:
    accountant: 'rdp' (default orders) or 'pld'.
    relation: The neighboring relation (add/remove one user by default).

  Returns:
    A `dp_accounting.PrivacyAccountant` with nothing composed yet.
  """
  _check_choice('accountant', accountant, ACCOUNTANTS)
  if accountant == 'rdp':
    return rdp.RdpAccountant(neighboring_relation=relation)
  return pld.PLDAccountant(
      neighboring_relation=relation,
      value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)


def _epsilon_of_event(event: dp_accounting.DpEvent, accountant: str,
                      relation: NeighboringRelation, delta: float) -> float:
  """epsilon of `event` at `delta` with a fresh accountant."""
  return float(make_accountant(accountant, relation).compose(event)
               .get_epsilon(delta))


def compute_epsilon(plan: DpPlan, accountant: str = 'rdp') -> float:
  """epsilon of the planned run at plan.delta with the RDP or PLD accountant."""
  check_supported(accountant, plan.sampling, plan.mechanism)
  return _epsilon_of_event(dp_event(plan), accountant,
                           neighboring_relation(plan), plan.delta)


def compute_epsilon_both(plan: DpPlan) -> Dict[str, float]:
  """{'rdp': epsilon, 'pld': epsilon}; raises if PLD doesn't support the plan."""
  return {a: compute_epsilon(plan, a) for a in ACCOUNTANTS}


def tree_aggregation_epsilon(noise_multiplier: float, clients_per_round: int,
                             population: int, rounds: int, delta: float,
                             restart_rounds: Optional[int] = None) -> float:
  """epsilon of DP-FTRL tree aggregation (RDP accountant).

  Assumes each user participates at most once per epoch of
  ceil(population / clients_per_round) rounds, and that the tree is restarted
  every `restart_rounds` rounds (a divisor of the epoch length; None = once per
  epoch, at the epoch start). Within an epoch every user touches at most one
  leaf of one tree, so no minimum separation between participations is needed;
  the epochs are composed. Adjacency: replace one user by the zero record.
  """
  return compute_epsilon(DpPlan(
      noise_multiplier, clients_per_round, population, rounds, delta,
      mechanism='tree', restart_rounds=restart_rounds), 'rdp')


# ---------------------------------------------------------------------------
# Calibration.


def _calibrate(epsilon_of: Callable[[float], float],
               make_fresh_accountant: Callable[[], dp_accounting.PrivacyAccountant],
               make_event: Callable[[float], dp_accounting.DpEvent],
               target_epsilon: float, delta: float) -> float:
  """Smallest noise multiplier (within tolerance) with epsilon <= target."""
  hi = 1.0
  while epsilon_of(hi) > target_epsilon:
    hi *= 2
    if hi > _MAX_NOISE_MULTIPLIER:
      raise ValueError(
          f'target_epsilon={target_epsilon} needs a noise_multiplier above '
          f'{_MAX_NOISE_MULTIPLIER:g}; use fewer rounds or more users')
  lo = hi / 2
  while epsilon_of(lo) <= target_epsilon:
    hi = lo
    lo /= 2
    if lo < _MIN_NOISE_MULTIPLIER:
      raise ValueError(
          f'target_epsilon={target_epsilon} is met already with noise_multiplier '
          f'{hi:g}; calibration below {_MIN_NOISE_MULTIPLIER:g} is not supported')
  return float(dp_accounting.calibrate_dp_mechanism(
      make_fresh_accountant, make_event, target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
      tol=CALIBRATION_TOLERANCE))


def calibrate_noise_multiplier(target_epsilon: float, clients_per_round: int,
                               population: int, rounds: int, delta: float,
                               sampling: str = 'poisson',
                               accountant: str = 'rdp',
                               mechanism: str = 'gaussian',
                               restart_rounds: Optional[int] = None) -> float:
  """Smallest noise multiplier whose epsilon is <= target_epsilon.

  Uses `dp_accounting.calibrate_dp_mechanism` on a bracket found by doubling
  / halving from 1.0 within [1/16, 1024]; the result is within
  CALIBRATION_TOLERANCE (absolute) of the exact value and never over budget.
  """
  target_epsilon = _check_positive('target_epsilon', target_epsilon)
  check_supported(accountant, sampling, mechanism)
  template = DpPlan(1.0, clients_per_round, population, rounds, delta,
                    sampling, mechanism, restart_rounds)
  relation = neighboring_relation(template)

  def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
    return dp_event(template.replace(noise_multiplier=noise_multiplier))

  def epsilon_of(noise_multiplier: float) -> float:
    return _epsilon_of_event(make_event(noise_multiplier), accountant, relation,
                             template.delta)

  return _calibrate(epsilon_of, lambda: make_accountant(accountant, relation),
                    make_event, target_epsilon, template.delta)


# ---------------------------------------------------------------------------
# Running epsilon and budgets.


class EpsilonTracker:
  """epsilon after any number of rounds of a plan, cheap enough for every round.

  For mechanism='gaussian' with the RDP accountant the per-round RDP curve is
  computed once; after t rounds it is t times that curve (exactly what
  `RdpAccountant` does for `SelfComposedDpEvent(event, t)`), converted to
  epsilon with dp_accounting's `compute_epsilon`. Other cases (tree, whose
  RDP is closed-form, and PLD, which composes a fresh accountant) compute the
  full event and cache results per round number.
  """

  def __init__(self, noise_multiplier: float, clients_per_round: int,
               population: int, delta: float, sampling: str = 'poisson',
               accountant: str = 'rdp', mechanism: str = 'gaussian',
               restart_rounds: Optional[int] = None):
    check_supported(accountant, sampling, mechanism)
    self._template = DpPlan(noise_multiplier, clients_per_round, population, 1,
                            delta, sampling, mechanism, restart_rounds)
    self._accountant = accountant
    self._cache: Dict[int, float] = {0: 0.0}
    self._orders = self._rdp_per_round = None
    if accountant == 'rdp' and mechanism == 'gaussian':
      acc = make_accountant('rdp', neighboring_relation(self._template))
      acc.compose(round_event(self._template))
      self._orders, self._rdp_per_round = acc.orders, acc.rdp

  @classmethod
  def from_plan(cls, plan: DpPlan, accountant: str = 'rdp') -> 'EpsilonTracker':
    """Tracker for `plan` (its `rounds` is ignored)."""
    return cls(plan.noise_multiplier, plan.clients_per_round, plan.population,
               plan.delta, plan.sampling, accountant, plan.mechanism,
               plan.restart_rounds)

  @property
  def delta(self) -> float:
    return self._template.delta

  def epsilon_after(self, round_num: int) -> float:
    """epsilon spent after `round_num` completed rounds (0 -> 0.0)."""
    round_num = _check_int('round_num', round_num, minimum=0)
    if round_num in self._cache:
      return self._cache[round_num]
    if self._rdp_per_round is not None:
      eps = rdp_privacy_accountant.compute_epsilon(
          self._orders, round_num * self._rdp_per_round, self.delta)[0]
    else:
      eps = compute_epsilon(self._template.replace(rounds=round_num),
                            self._accountant)
    eps = float(eps)
    self._cache[round_num] = eps
    return eps

  def max_rounds_within(self, target_epsilon: float,
                        upper: Optional[int] = None) -> int:
    """Largest t (0 if none, at most `upper`) with epsilon_after(t) <= target.

    Without `upper`, searches by doubling up to MAX_SEARCH_ROUNDS and raises
    ValueError if even that many rounds stay within the budget.
    """
    target_epsilon = _check_positive('target_epsilon', target_epsilon)
    within = lambda t: self.epsilon_after(t) <= target_epsilon
    if upper is not None:
      upper = _check_int('upper', upper, minimum=0)
      if within(upper):
        return upper
      lo, hi = 0, upper
    else:
      lo, hi = 0, 1
      while within(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_SEARCH_ROUNDS:
          if within(MAX_SEARCH_ROUNDS):
            raise ValueError(
                f'epsilon stays <= target_epsilon={target_epsilon} for more than '
                f'{MAX_SEARCH_ROUNDS} rounds')
          hi = MAX_SEARCH_ROUNDS
    # Invariant: within(lo), not within(hi).
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if within(mid):
        lo = mid
      else:
        hi = mid
    return lo


def max_rounds_within(target_epsilon: float, noise_multiplier: float,
                      clients_per_round: int, population: int, delta: float,
                      sampling: str = 'poisson', accountant: str = 'rdp',
                      mechanism: str = 'gaussian',
                      restart_rounds: Optional[int] = None) -> int:
  """Largest number of rounds whose epsilon is <= target_epsilon (may be 0)."""
  tracker = EpsilonTracker(noise_multiplier, clients_per_round, population,
                           delta, sampling, accountant, mechanism, restart_rounds)
  return tracker.max_rounds_within(target_epsilon)


def check_budget(plan: DpPlan, target_epsilon: float,
                 on_exceed: str = 'refuse', accountant: str = 'rdp') -> int:
  """Number of rounds to run so that epsilon <= target_epsilon.

  Returns plan.rounds when the plan fits the budget. Otherwise, with
  on_exceed='refuse' raises BudgetExceededError (planned epsilon, target and
  the max rounds within budget in the message); with on_exceed='stop' returns
  that max number of rounds, or raises BudgetExceededError if even one round
  is over budget.
  """
  target_epsilon = _check_positive('target_epsilon', target_epsilon)
  _check_choice('on_exceed', on_exceed, ('refuse', 'stop'))
  tracker = EpsilonTracker.from_plan(plan, accountant)
  planned = tracker.epsilon_after(plan.rounds)
  if planned <= target_epsilon:
    return plan.rounds
  max_rounds = tracker.max_rounds_within(target_epsilon, upper=plan.rounds)
  if on_exceed == 'refuse' or max_rounds == 0:
    raise BudgetExceededError(planned, target_epsilon, max_rounds, plan.rounds)
  return max_rounds


# ---------------------------------------------------------------------------
# Central DP-SGD (TF Privacy baseline).


def dpsgd_epsilon(noise_multiplier: float, sampling_probability: float,
                  steps: int, delta: float, accountant: str = 'rdp') -> float:
  """epsilon of DP-SGD with Poisson sampling (add/remove-one adjacency).

  Each record (example, or user for user-level DP-SGD) is in a batch with
  probability `sampling_probability`; `steps` noisy steps are composed.
  """
  noise_multiplier = _check_positive('noise_multiplier', noise_multiplier)
  q = _check_positive('sampling_probability', sampling_probability)
  if q > 1:
    raise ValueError(f'sampling_probability must be <= 1, got {q}')
  steps = _check_int('steps', steps)
  delta = _check_delta(delta)
  check_supported(accountant)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  return _epsilon_of_event(event, accountant,
                           NeighboringRelation.ADD_OR_REMOVE_ONE, delta)


def dpsgd_epsilon_clt(noise_multiplier: float, sampling_probability: float,
                      steps: int, delta: float) -> float:
  """CLT estimate of DP-SGD epsilon (Bu, Dong, Long, Su 2020), Poisson sampling.

  Uses TF Privacy's `gdp_accountant.compute_eps_poisson`. mu-GDP with
  mu = q * sqrt(steps * (exp(1 / noise_multiplier**2) - 1)) is a central limit
  approximation, not an upper bound: it can under-state epsilon for few steps
  or large q. Report it next to `dpsgd_epsilon`, never instead of it.
  """
  noise_multiplier = _check_positive('noise_multiplier', noise_multiplier)
  q = _check_positive('sampling_probability', sampling_probability)
  if q > 1:
    raise ValueError(f'sampling_probability must be <= 1, got {q}')
  steps = _check_int('steps', steps)
  delta = _check_delta(delta)
  try:
    from tensorflow_privacy.privacy.analysis import gdp_accountant  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'dpsgd_epsilon_clt needs tensorflow_privacy.privacy.analysis.'
        'gdp_accountant (TF Privacy >= 0.5)') from e
  # compute_eps_poisson(epoch, noise, n, batch_size) uses steps = epoch * n /
  # batch_size and q = batch_size / n; n = 1, batch_size = q gives both.
  try:
    return float(gdp_accountant.compute_eps_poisson(
        steps * q, noise_multiplier, 1.0, q, delta))
  except ValueError as e:
    raise ValueError(
        f'CLT epsilon is outside [0, 500] for noise_multiplier='
        f'{noise_multiplier}, sampling_probability={q}, steps={steps}') from e


# ---------------------------------------------------------------------------
# A summary for binaries and logs.


def privacy_report(noise_multiplier: Optional[float], clients_per_round: int,
                   population: int, rounds: Optional[int], delta: float,
                   sampling: str = 'poisson',
                   accountants: Sequence[str] = ('rdp',),
                   mechanism: str = 'gaussian',
                   restart_rounds: Optional[int] = None,
                   target_epsilon: Optional[float] = None) -> dict:
  """JSON-ready summary of a planned run, per accountant.

  * noise_multiplier and rounds: epsilon of the plan (and, with a target,
    whether it fits and the max rounds within budget);
  * target_epsilon and rounds, no noise_multiplier: the calibrated noise
    multiplier and its epsilon;
  * noise_multiplier and target_epsilon, no rounds: the max rounds within
    budget.
  """
  if noise_multiplier is None and target_epsilon is None:
    raise ValueError('give noise_multiplier, target_epsilon or both')
  if rounds is None and (noise_multiplier is None or target_epsilon is None):
    raise ValueError('rounds is needed unless both noise_multiplier and '
                     'target_epsilon are given')
  accountants = list(accountants)
  if not accountants:
    raise ValueError('accountants must not be empty')
  for a in accountants:
    check_supported(a, sampling, mechanism)
  # Validates every argument before any accounting work.
  template = DpPlan(1.0 if noise_multiplier is None else noise_multiplier,
                    clients_per_round, population,
                    1 if rounds is None else rounds, delta, sampling, mechanism,
                    restart_rounds)
  if target_epsilon is not None:
    target_epsilon = _check_positive('target_epsilon', target_epsilon)
  report = {
      'mechanism': mechanism,
      'sampling': None if mechanism == 'tree' else sampling,
      'neighboring_relation': neighboring_relation(template).name,
      'noise_multiplier': noise_multiplier,
      'clients_per_round': clients_per_round,
      'population': population,
      'sampling_probability': template.sampling_probability,
      'rounds': rounds,
      'delta': template.delta,
      'target_epsilon': target_epsilon,
      'dp_accounting_version': _dp_accounting_version(),
      'results': {},
  }
  if mechanism == 'tree':
    report['epoch_rounds'] = template.epoch_rounds
    report['restart_rounds'] = restart_rounds or template.epoch_rounds
  if 'pld' in accountants:
    report['pld_value_discretization_interval'] = PLD_VALUE_DISCRETIZATION_INTERVAL
  for a in accountants:
    result = {}
    if noise_multiplier is None:
      nm = calibrate_noise_multiplier(target_epsilon, clients_per_round,
                                      population, rounds, delta, sampling, a,
                                      mechanism, restart_rounds)
      result['calibrated_noise_multiplier'] = nm
      result['epsilon'] = compute_epsilon(template.replace(noise_multiplier=nm), a)
    else:
      plan = template.replace(noise_multiplier=noise_multiplier)
      tracker = EpsilonTracker.from_plan(plan, a)
      if rounds is not None:
        result['epsilon'] = tracker.epsilon_after(rounds)
      if target_epsilon is not None:
        if rounds is not None:
          result['within_budget'] = result['epsilon'] <= target_epsilon
        result['max_rounds_within_budget'] = tracker.max_rounds_within(
            target_epsilon)
    report['results'][a] = result
  return report


def _dp_accounting_version() -> str:
  """Installed dp_accounting version (for provenance)."""
  try:
    return metadata.version('dp-accounting')
  except metadata.PackageNotFoundError:
    return 'unknown'
