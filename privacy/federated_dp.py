"""User-level differential privacy for federated training: checks, plan, ε.

`prepare_dp` validates a DP request against the run (weighting, user
embeddings, sampling), fixes the noise multiplier and the number of rounds
against the budget, and returns a `DpSetup` with the aggregator to pass to
`build_process` / `run_federated`, the per-round ε metrics and a report.

What the guarantee covers
-------------------------
Unit of privacy: one user = one client = all of that user's training ratings
(user-level DP). Neighbouring datasets differ in one user: added/removed
(Poisson sampling), replaced by another user (fixed-size sampling), or
replaced by a user contributing a zero update (tree modes); see
`privacy/accounting.py`.

What is protected: the sequence of global models the server computes and
releases after every round (hence the final model, checkpoints of it, and
anything computed from those models alone). Every client's whole update of
the *global* variables is clipped to L2 norm `clip`, and the server (or, for
'ddp', the clients themselves) adds noise to the sum, which is divided by the
expected number of clients (a public constant). The running ε reported as
`dp/epsilon` bounds the privacy loss of the models released up to that round
at `dp/delta`, with the accountant chosen ('rdp' or 'pld').

Assumptions the number depends on:
* Clients are sampled exactly as the accountant assumes, and which users took
  part is kept secret: 'poisson' (each user independently with probability
  clients_per_round / population) or 'fixed_size' (uniformly without
  replacement, independently each round) for the Gaussian modes, as
  `tff_rec.training.sampling.ClientSampler` does; 'shuffled_epochs' (each user
  at most once per epoch of ceil(population / clients_per_round) rounds) for
  the tree modes (`EpochShuffleSampler`), with the tree restarted at least
  once per epoch, at epoch boundaries.
* In this simulation the participants of a round are a deterministic
  function of --seed (recorded in hparams.json). Privacy amplification by
  sampling assumes nobody outside the server knows who took part, so the
  reported ε is that of a deployment with secret random sampling; whoever
  knows the seed can tell who participated.
* Uniform client weighting (a count-weighted mean gives users with many
  ratings unbounded influence) and one client per user.
* The population (the users that can be sampled) is fixed and public.

Federated Reconstruction: user embeddings are local variables, rebuilt on the
device every round and never sent; only the update of the global variables
(item embeddings, biases, towers) is clipped, noised and aggregated. A
user's own embedding and the recommendations computed on the device are
never released, so they are not part of the guarantee.

Trust: the guarantee is about what is released, not about what the server
sees. In the central modes a trusted server receives every clipped update in
the clear and adds the noise; only 'ddp' (clients add noise shares) with
`--secure_aggregation=secagg|secagg_plus|he` (privacy/secure_rounds.py: the
server learns only the sum) limits what the server itself learns; with the
default `--secure_aggregation=none`, TFF's simulated secure sum is a plain
sum and the server-side code sees each client's vector. FedAvg with a user
table (each user's own row inside the global model) is refused: the released model would contain every participant's row, which
no clipping of the update turns into a meaningful user-level guarantee for
per-user parameters; use FedRecon. The row-sparse mean is never used with DP
(it reveals which rows each client touched).

NOT covered (released without noise, outside the accountant):
* Training metrics aggregated from the clients each round (loss, accuracy,
  example counts of `tff.learning`'s metrics aggregator, logged to
  metrics.csv/TensorBoard) and, with Poisson sampling, the number of
  participating clients. Treat them as debug output, or do not release them.
* Evaluation: periodic and final metrics on validation/test users (after
  reconstructing held-out users' embeddings from their own ratings, for
  FedRecon) are exact aggregates of those users' data. Held-out users are not
  in the training population, so the training guarantee says nothing about
  them either way; metrics about training users' data are plain (non-DP)
  statistics of that data.
* `zeroing=True`: the zeroing threshold and the zeroed-client count are
  estimated without noise.
* 'ddp': ε is a Gaussian approximation of the distributed Skellam mechanism
  (it ignores the small sensitivity inflation of randomized rounding and the
  Skellam-vs-Gaussian difference), and the mean divides by the securely
  summed client count, which the server learns; fixed-size sampling is
  required so that this count is the public clients_per_round.
* Hyper-parameter tuning, repeated runs over the same users, and the
  privacy of the data split/selection itself.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging

from privacy import accounting
from privacy import dp_aggregators
from tff_rec.training import sampling as sampling_lib

DpConfig = dp_aggregators.DpConfig
MODES = dp_aggregators.MODES

# Client sampling of the simulation (tff_rec.training.sampling) plus the
# per-epoch shuffle the tree modes need.
EPOCH_SAMPLING = 'shuffled_epochs'
GAUSSIAN_SAMPLINGS = ('poisson', 'fixed_size')
UNIFORM_WEIGHTING = 'uniform'
TABLE_EMBEDDING = 'table'


class DpSetupError(ValueError):
  """A DP request that cannot give the guarantee (message names the flags)."""


@dataclasses.dataclass
class DpSetup:
  """DP pieces of one federated run (see `prepare_dp`).

  Attributes:
    config: the DP config, with the noise multiplier filled in.
    aggregator: unweighted TFF factory for `build_process` (None: no DP).
    total_rounds: rounds to run (fewer than requested with on_budget='stop').
    requested_rounds: rounds asked for.
    clients_per_round, population, sampling, delta: the accounting plan.
    restart_rounds: tree modes: tree restart period (rounds).
    needs_secure_context: the aggregator uses secure sums ('ddp'): install
      `runtime.set_local_context(secure_intrinsics=True)`.
  """

  config: DpConfig
  aggregator: Any
  total_rounds: int
  requested_rounds: int
  clients_per_round: int
  population: int
  sampling: str
  delta: Optional[float]
  restart_rounds: Optional[int] = None
  needs_secure_context: bool = False
  calibrated: bool = False
  _tracker: Optional[accounting.EpsilonTracker] = dataclasses.field(default=None, repr=False)

  @property
  def enabled(self) -> bool:
    return self.config.enabled

  @property
  def plan(self) -> Optional[accounting.DpPlan]:
    """The accounting plan of the rounds to run (None without noise)."""
    if not self.enabled or not self.config.noise_multiplier:
      return None
    return accounting.DpPlan(
        self.config.noise_multiplier, self.clients_per_round, self.population,
        self.total_rounds, self.delta, _plan_sampling(self.sampling),
        self.config.mechanism, self.restart_rounds)

  def epsilon_after(self, round_num: int) -> float:
    """ε spent after `round_num` rounds (inf without noise, 0 without DP)."""
    if not self.enabled:
      return 0.0
    if self._tracker is None:
      return 0.0 if round_num == 0 else math.inf
    return self._tracker.epsilon_after(round_num)

  @property
  def extra_metrics_fn(self) -> Optional[Callable[[int], Mapping[str, float]]]:
    """`round_num -> {'dp/epsilon', 'dp/delta'}` for `run_federated` (None: no DP)."""
    if not self.enabled:
      return None

    def metrics(round_num: int) -> Mapping[str, float]:
      return collections.OrderedDict([
          ('dp/epsilon', float(self.epsilon_after(int(round_num)))),
          ('dp/delta', float(self.delta)),
      ])

    return metrics

  def report(self) -> dict:
    """JSON-ready description of the mechanism, plan and ε (for hparams)."""
    c = self.config
    if not self.enabled:
      return {'mode': 'none'}
    out = {
        'mode': c.mode,
        'noise_multiplier': c.noise_multiplier,
        'noise_multiplier_calibrated': self.calibrated,
        'value_noise_multiplier': dp_aggregators.value_noise_multiplier(c, self.clients_per_round),
        'clip': c.initial_clip,
        'clip_is_adaptive': c.adaptive,
        'zeroing': c.zeroing,
        'clients_per_round': self.clients_per_round,
        'population': self.population,
        'sampling': self.sampling,
        'sampling_probability': self.clients_per_round / self.population,
        'delta': self.delta,
        'accountant': c.accountant,
        'requested_rounds': self.requested_rounds,
        'total_rounds': self.total_rounds,
        'target_epsilon': c.target_epsilon,
        'on_budget': c.on_budget,
        'epsilon': self.epsilon_after(self.total_rounds),
        'unit': 'user',
        'covers': 'the global models released after every round',
        'not_covered': _not_covered(c, self.sampling),
    }
    plan = self.plan
    if plan is not None:
      out['neighboring_relation'] = accounting.neighboring_relation(plan).name
    if c.adaptive:
      out['target_unclipped_quantile'] = c.target_unclipped_quantile
      out['clip_learning_rate'] = c.clip_learning_rate
      out['clipped_count_stddev'] = dp_aggregators.clipped_count_stddev(c, self.clients_per_round)
    if c.mode in dp_aggregators.TREE_MODES:
      out['restart_rounds'] = self.restart_rounds
      out['epoch_rounds'] = accounting.epoch_rounds(self.clients_per_round, self.population)
    if c.mode == 'ddp':
      out['ddp_bits'] = c.ddp_bits
      out['epsilon_is_gaussian_approximation'] = True
    return out


def _not_covered(config: DpConfig, sampling: str) -> list[str]:
  items = [
      'per-round training metrics aggregated from clients (metrics.csv, TensorBoard)',
      'evaluation metrics (validation/test), computed without noise',
      'who took part: the simulated sampling is a function of the recorded seed '
      '(epsilon assumes secret random sampling)',
  ]
  if sampling == 'poisson':
    items.append('the number of clients in each round')
  if config.zeroing:
    items.append('the adaptive zeroing threshold and zeroed-client counts')
  if config.mode == 'ddp':
    items.append('epsilon is a Gaussian approximation of distributed Skellam noise')
  if not config.noise_multiplier:
    items.append('everything: noise_multiplier is 0 (clipping only, epsilon = inf)')
  return items


def _plan_sampling(sampling: str) -> str:
  """The accounting module's sampling name (tree modes ignore it)."""
  return 'poisson' if sampling == 'poisson' else 'fixed_size'


def _norm(value: Any) -> str:
  """An enum's value or the string itself (UserEmbedding is a str enum)."""
  return str(getattr(value, 'value', value))


def check_compatible(config: DpConfig, *, weighting: str, user_embedding: Any,
                     sampling: str, row_sparse_mean: bool = False) -> None:
  """Raises DpSetupError if DP cannot give its guarantee for this run."""
  if not config.enabled:
    return
  weighting = _norm(weighting)
  if weighting != UNIFORM_WEIGHTING:
    raise DpSetupError(
        f'--dp={config.mode} needs --weighting=uniform, got --weighting={weighting}: '
        'weighting clients by their number of ratings gives a user with many '
        'ratings unbounded influence on the mean, so user-level clipping no '
        'longer bounds a user\'s contribution')
  if _norm(user_embedding) == TABLE_EMBEDDING:
    raise DpSetupError(
        f'--dp={config.mode} cannot train a user embedding table inside the global '
        'model (FedAvg/FedProx on users seen in training): the released model '
        'would hold every participant\'s own row. Use --algorithm=fedrecon, which '
        'keeps user embeddings on the device, or a split with held-out users')
  if row_sparse_mean:
    raise DpSetupError(
        f'--dp={config.mode} cannot be combined with the row-sparse mean '
        '(AlgorithmConfig.row_sparse_mean=True): it reveals which embedding rows '
        'each client touched. DP replaces the aggregator; set row_sparse_mean=False')
  if config.mode in dp_aggregators.TREE_MODES:
    if sampling != EPOCH_SAMPLING:
      raise DpSetupError(
          f'--dp={config.mode} needs --sampling={EPOCH_SAMPLING} (every user at most '
          'once per epoch); with independent per-round sampling a user can take '
          'part several times per tree, which the tree accountant does not cover')
  elif sampling not in GAUSSIAN_SAMPLINGS:
    raise DpSetupError(
        f'--dp={config.mode} needs --sampling=poisson or fixed_size, got {sampling}')
  if config.mode == 'ddp' and sampling != 'fixed_size':
    raise DpSetupError(
        '--dp=ddp needs --sampling=fixed_size: the clients split the noise in '
        'clients_per_round shares, so a smaller (Poisson) round would get less '
        'noise, and the mean divides by the actual client count')
  try:
    accounting.check_supported(config.accountant, _plan_sampling(sampling), config.mechanism)
  except accounting.UnsupportedAccountingError as e:
    raise DpSetupError(f'--dp_accountant={config.accountant} with --dp={config.mode} '
                       f'--sampling={sampling}: {e}') from e


def prepare_dp(
    dp_config: DpConfig,
    *,
    clients_per_round: int,
    population: int,
    total_rounds: int,
    sampling: str,
    weighting: str,
    user_embedding: Any,
    row_sparse_mean: bool = False,
) -> DpSetup:
  """Checks the request, fixes noise and rounds, builds the aggregator.

  Raises DpSetupError (a ValueError naming the flags) for requests without a
  guarantee, and `accounting.BudgetExceededError` when the plan is over
  `target_epsilon` with on_budget='refuse' (or even one round is over).
  """
  rounds = int(total_rounds)
  if rounds < 1:
    raise ValueError(f'total_rounds must be >= 1, got {total_rounds}')
  if not dp_config.enabled:
    return DpSetup(dp_config, None, rounds, rounds, clients_per_round, population,
                   sampling, None)
  check_compatible(dp_config, weighting=weighting, user_embedding=user_embedding,
                   sampling=sampling, row_sparse_mean=row_sparse_mean)
  if not 1 <= clients_per_round <= population:
    raise ValueError(f'clients_per_round={clients_per_round} must be in [1, population={population}]')
  delta = dp_config.delta if dp_config.delta is not None else accounting.default_delta(population)
  restart = None
  mechanism = dp_config.mechanism
  if mechanism == 'tree':
    restart = dp_config.restart_rounds or accounting.epoch_rounds(clients_per_round, population)
    try:
      accounting.check_restart_rounds(restart, clients_per_round, population)
    except ValueError as e:
      raise DpSetupError(f'--dp_restart_rounds: {e}') from e
  plan_sampling = _plan_sampling(sampling)

  config = dp_config
  calibrated = False
  if config.noise_multiplier is None:
    config = config.replace(noise_multiplier=accounting.calibrate_noise_multiplier(
        config.target_epsilon, clients_per_round, population, rounds, delta,
        plan_sampling, config.accountant, mechanism, restart))
    calibrated = True
    logging.info('DP: calibrated noise_multiplier %.6f for epsilon %g over %d rounds',
                 config.noise_multiplier, config.target_epsilon, rounds)
  nm = float(config.noise_multiplier)
  dp_aggregators.value_noise_multiplier(config, clients_per_round)  # Early, clear error.

  tracker = None
  run_rounds = rounds
  if nm > 0:
    plan = accounting.DpPlan(nm, clients_per_round, population, rounds, delta,
                             plan_sampling, mechanism, restart)
    if config.target_epsilon is not None:
      run_rounds = accounting.check_budget(plan, config.target_epsilon, config.on_budget,
                                           config.accountant)
    tracker = accounting.EpsilonTracker.from_plan(plan, config.accountant)
    if run_rounds < rounds:
      logging.warning(
          'DP budget: target epsilon %g at delta %.3g (%s accountant) allows %d of the %d '
          'requested rounds; training stops after round %d, at epsilon %.4g (round %d would '
          'reach %.4g)', config.target_epsilon, delta, config.accountant, run_rounds, rounds,
          run_rounds, tracker.epsilon_after(run_rounds), run_rounds + 1,
          tracker.epsilon_after(run_rounds + 1))
  elif config.target_epsilon is not None:
    raise DpSetupError('--dp_noise_multiplier=0 gives no privacy (epsilon = inf) and '
                       'cannot meet --target_epsilon')
  else:
    logging.warning('DP: noise_multiplier=0: clipping only, epsilon = inf')

  aggregator = dp_aggregators.build_aggregator(config, clients_per_round, restart)
  return DpSetup(
      config=config,
      aggregator=aggregator,
      total_rounds=run_rounds,
      requested_rounds=rounds,
      clients_per_round=int(clients_per_round),
      population=int(population),
      sampling=sampling,
      delta=float(delta),
      restart_rounds=restart,
      needs_secure_context=config.mode == 'ddp',
      calibrated=calibrated,
      _tracker=tracker,
  )


def EpochShuffleSampler(users: Sequence[int], clients_per_round: int,  # pylint: disable=invalid-name
                        seed: int) -> sampling_lib.ClientSampler:
  """Clients per round with each user at most once per epoch (tree modes)."""
  return sampling_lib.ClientSampler(users, clients_per_round, seed, mode=EPOCH_SAMPLING)


def prepare_personalized_dp(dp_config: DpConfig, *, clients_per_round: Optional[int],
                            population: int, total_rounds: int) -> DpSetup:
  """`prepare_dp` for the personalized loop (`tff_rec.training.personalized_loop`).

  That loop takes every user in every round (`clients_per_round` None or at
  least the population), or draws each round's participants uniformly
  without replacement, independently per round ('fixed_size' sampling). The
  tree modes need every user at most once per epoch, which holds only with
  full participation (an epoch of one round). Only the item table is
  aggregated; the device state (score function, user vector) never leaves
  the device, so it is outside what is released.

  Args:
    dp_config: The DP choice.
    clients_per_round: The loop's participants per round (None: everyone).
    population: The number of users.
    total_rounds: The rounds asked for.

  Returns:
    `DpSetup` (aggregator, accountant, rounds within budget).

  Raises:
    DpSetupError: a tree mode with sampled participation, or another request
      without a guarantee (the message names the flag).
    accounting.BudgetExceededError: over `target_epsilon` with on_budget='refuse'.
  """
  clients = min(clients_per_round or population, population)
  sampling = 'fixed_size'
  if dp_config.mode in dp_aggregators.TREE_MODES:
    if clients < population:
      raise DpSetupError(
          f'--dp={dp_config.mode} with --clients_per_round={clients_per_round}: the tree '
          'accountant needs every user at most once per epoch, and this loop samples each round '
          'independently; omit --clients_per_round (every user every round)')
    sampling = EPOCH_SAMPLING
  return prepare_dp(dp_config, clients_per_round=clients, population=population,
                    total_rounds=total_rounds, sampling=sampling, weighting=UNIFORM_WEIGHTING,
                    user_embedding=None)
