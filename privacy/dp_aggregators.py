"""Differentially private model-update aggregators (TFF factories) by mode.

`DpConfig` describes the mechanism; `build_aggregator` turns it into an
unweighted `tff.aggregators` factory that clips every client's whole model
update, adds noise and divides by the (expected) number of clients per round:

* 'gaussian_fixed': `DifferentiallyPrivateFactory.gaussian_fixed` (DP-FedAvg,
  McMahan et al. 2018): clip to `clip`, Gaussian noise of std
  `noise_multiplier * clip` on the sum.
* 'gaussian_adaptive': `DifferentiallyPrivateFactory.gaussian_adaptive`
  (Andrew et al. 2021): the clip norm tracks the `target_unclipped_quantile`
  of the update norms; `noise_multiplier` is the effective total, the noise on
  the values is slightly larger (`value_noise_multiplier`) to pay for the
  noised clipped count.
* 'tree': DP-FTRL tree aggregation (Kairouz et al. 2021), TF Privacy's
  `TreeResidualSumQuery` restarted every `restart_rounds` rounds by
  `RestartQuery` + `PeriodicRoundRestartIndicator` (TFF's `tree_aggregation`
  never restarts, which the accountant cannot analyse across epochs).
* 'tree_adaptive': `QAdaClipTreeResSumQuery` (adaptive clip, adopted at each
  restart) with the same restarts (TFF's `tree_adaptive` restarts on a fixed
  128/1024 schedule, not at epoch boundaries).
* 'ddp': distributed DP (Kairouz et al. 2021b; Agarwal et al. 2021): TFF's
  `DistributedDpSumFactory` (discretisation, distributed Skellam noise added
  by the clients, secure aggregation, adaptive clip) inside a mean over the
  securely summed client count, as `tff.learning.ddp_secure_aggregator`, but
  with the initial clip and adaptation from the config. Needs a context that
  executes `federated_secure_sum_bitwidth` (`runtime.set_local_context(
  secure_intrinsics=True)`).

`zeroing=True` wraps the factory in `tff.aggregators.zeroing_factory` with the
non-private quantile estimate of `tff.learning.dp_aggregator` (updates with
norm above ~2x the 98th percentile + 1 are replaced by zeros). That estimate
and the zeroed count use no noise: they are outside the DP guarantee.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy as tff_dp
from tensorflow_federated.python.aggregators import distributed_dp
import tensorflow_privacy as tfp

MODES = ('none', 'gaussian_fixed', 'gaussian_adaptive', 'tree', 'tree_adaptive', 'ddp')
ADAPTIVE_MODES = ('gaussian_adaptive', 'tree_adaptive', 'ddp')
TREE_MODES = ('tree', 'tree_adaptive')
ON_BUDGET = ('refuse', 'stop')
ACCOUNTANTS = ('rdp', 'pld')
DDP_ROTATIONS = ('hd', 'dft')

# Initial clip of the adaptive modes when `clip` is unset (TFF's default).
DEFAULT_INITIAL_CLIP = 0.1


@dataclasses.dataclass(frozen=True)
class DpConfig:
  """A DP mechanism for federated training (the --dp* flags).

  Attributes:
    mode: one of MODES ('none' disables DP).
    noise_multiplier: noise std / clip norm (effective total for the adaptive
      modes). None: calibrate it from `target_epsilon`.
    clip: L2 clip norm of a client update (initial clip for adaptive modes;
      default DEFAULT_INITIAL_CLIP there, required otherwise).
    target_unclipped_quantile: adaptive modes: quantile of update norms the
      clip tracks.
    clip_learning_rate: adaptive modes: geometric learning rate of the clip.
    clipped_count_stddev: adaptive modes: noise std of the clipped count
      (None: 0.05 * clients_per_round, as in TFF).
    zeroing: zero out updates with very large norm (see module docstring).
    delta: target delta (None: 1 / population**1.1).
    target_epsilon: privacy budget (optional).
    on_budget: over budget: 'refuse' to start, or 'stop' after the last round
      within budget.
    accountant: 'rdp' or 'pld'.
    restart_rounds: tree modes: restart the tree every this many rounds (a
      divisor of the epoch length; None: once per epoch).
    ddp_bits: ddp: secure-aggregation bit width (1..22).
    ddp_rotation: ddp: 'hd' (Hadamard) or 'dft'.
    noise_seed: tree modes: seed of the tree noise (None: nondeterministic).
  """

  mode: str = 'none'
  noise_multiplier: Optional[float] = None
  clip: Optional[float] = None
  target_unclipped_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  clipped_count_stddev: Optional[float] = None
  zeroing: bool = False
  delta: Optional[float] = None
  target_epsilon: Optional[float] = None
  on_budget: str = 'refuse'
  accountant: str = 'rdp'
  restart_rounds: Optional[int] = None
  ddp_bits: int = 20
  ddp_rotation: str = 'hd'
  noise_seed: Optional[int] = None

  def __post_init__(self):
    _choice('mode', self.mode, MODES)
    _choice('on_budget', self.on_budget, ON_BUDGET)
    _choice('accountant', self.accountant, ACCOUNTANTS)
    _choice('ddp_rotation', self.ddp_rotation, DDP_ROTATIONS)
    if self.noise_multiplier is not None:
      _number('noise_multiplier', self.noise_multiplier, minimum=0.0)
    if self.clip is not None:
      _number('clip', self.clip, minimum=0.0, strict=True)
    if not 0.0 <= _number('target_unclipped_quantile', self.target_unclipped_quantile) <= 1.0:
      raise ValueError('target_unclipped_quantile must be in [0, 1], got '
                       f'{self.target_unclipped_quantile}')
    _number('clip_learning_rate', self.clip_learning_rate, minimum=0.0)
    if self.clipped_count_stddev is not None:
      _number('clipped_count_stddev', self.clipped_count_stddev, minimum=0.0)
    if self.delta is not None and not 0.0 < _number('delta', self.delta) < 1.0:
      raise ValueError(f'delta must be in (0, 1), got {self.delta}')
    if self.target_epsilon is not None:
      _number('target_epsilon', self.target_epsilon, minimum=0.0, strict=True)
    if self.restart_rounds is not None:
      _integer('restart_rounds', self.restart_rounds, minimum=1)
    if not 1 <= _integer('ddp_bits', self.ddp_bits, minimum=1) <= 22:
      raise ValueError(f'ddp_bits must be in [1, 22], got {self.ddp_bits}')
    if not self.enabled:
      return
    if self.noise_multiplier is None and self.target_epsilon is None:
      raise ValueError(f'mode={self.mode!r} needs noise_multiplier or target_epsilon')
    if self.clip is None and self.mode not in ADAPTIVE_MODES:
      raise ValueError(f'mode={self.mode!r} needs clip (the L2 clip norm of a client update)')
    if self.restart_rounds is not None and self.mode not in TREE_MODES:
      raise ValueError(f'restart_rounds only applies to the tree modes, not {self.mode!r}')

  @property
  def enabled(self) -> bool:
    return self.mode != 'none'

  @property
  def adaptive(self) -> bool:
    return self.mode in ADAPTIVE_MODES

  @property
  def mechanism(self) -> str:
    """The accounting mechanism: 'tree' for the tree modes, else 'gaussian'."""
    return 'tree' if self.mode in TREE_MODES else 'gaussian'

  @property
  def initial_clip(self) -> float:
    """The clip norm (the initial one for adaptive modes)."""
    if self.clip is not None:
      return float(self.clip)
    if self.adaptive:
      return DEFAULT_INITIAL_CLIP
    raise ValueError(f'mode={self.mode!r} needs clip')

  def replace(self, **changes) -> 'DpConfig':
    return dataclasses.replace(self, **changes)


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name} must be one of {list(choices)}, got {value!r}')
  return value


def _number(name, value, minimum=None, strict=False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f'{name} must be a finite number, got {value!r}')
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    raise ValueError(f'{name} must be {">" if strict else ">="} {minimum}, got {value}')
  return float(value)


def _integer(name, value, minimum) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


# ---------------------------------------------------------------------------
# Noise of the adaptive modes.


def clipped_count_stddev(config: DpConfig, clients_per_round: int) -> float:
  """Noise std of the clipped count (adaptive modes; TFF's default 0.05 * n).

  0 when noise_multiplier is 0 and no std was given (TFF's convention).
  """
  if config.clipped_count_stddev is not None:
    return float(config.clipped_count_stddev)
  if not config.noise_multiplier:
    return 0.0
  return 0.05 * clients_per_round


def value_noise_multiplier(config: DpConfig, clients_per_round: int) -> float:
  """Noise multiplier actually applied to the clipped updates.

  Equal to `noise_multiplier` for the fixed-clip modes. For the adaptive modes
  the values get more noise so that values and the clipped count together are
  one Gaussian mechanism with the effective `noise_multiplier` (Andrew et al.
  2021): 1/nm^2 = 1/value_nm^2 + 1/(2 * clipped_count_stddev)^2.
  """
  nm = float(config.noise_multiplier)
  if not config.adaptive:
    return nm
  stddev = clipped_count_stddev(config, clients_per_round)
  if nm > 0 and nm >= 2 * stddev:
    raise ValueError(
        f'noise_multiplier={nm} is too large for the adaptive clip: it must be < '
        f'2 * clipped_count_stddev = {2 * stddev:g} (0.05 * clients_per_round by '
        'default); use more clients per round, a fixed clip, or a larger '
        'clipped_count_stddev')
  value_nm, _ = tff_dp.adaptive_clip_noise_params(nm, float(clients_per_round), stddev)
  return float(value_nm)


# ---------------------------------------------------------------------------
# Factories.


class _TreeFactory(tff.aggregators.UnweightedAggregationFactory):
  """DP-FTRL tree aggregation restarted every `restart_rounds` rounds.

  The DP query needs the record specs, so it is built in `create`.
  """

  def __init__(self, config: DpConfig, clients_per_round: int, restart_rounds: int):
    self._config = config
    self._clients_per_round = float(clients_per_round)
    self._restart_rounds = _integer('restart_rounds', restart_rounds, 1)

  def _sum_query(self, record_specs):
    c = self._config
    if c.mode == 'tree':
      return tfp.TreeResidualSumQuery.build_l2_gaussian_query(
          c.initial_clip, float(c.noise_multiplier), record_specs,
          noise_seed=c.noise_seed, use_efficient=True)
    return tfp.QAdaClipTreeResSumQuery(
        c.initial_clip,
        value_noise_multiplier(c, int(self._clients_per_round)),
        record_specs,
        c.target_unclipped_quantile,
        c.clip_learning_rate,
        clipped_count_stddev(c, int(self._clients_per_round)),
        self._clients_per_round,
        geometric_update=True,
        noise_seed=c.noise_seed)

  def create(self, value_type) -> tff.templates.AggregationProcess:
    record_specs = tff.types.type_to_tf_tensor_specs(value_type)
    query = tfp.RestartQuery(
        self._sum_query(record_specs),
        tfp.restart_query.PeriodicRoundRestartIndicator(period=self._restart_rounds))
    query = tfp.NormalizedQuery(query, denominator=self._clients_per_round)
    return tff.aggregators.DifferentiallyPrivateFactory(query).create(value_type)


def _ddp_factory(config: DpConfig, clients_per_round: int) -> tff.aggregators.UnweightedAggregationFactory:
  """Distributed Skellam DP with secure aggregation, mean over the client count."""
  sum_factory = distributed_dp.DistributedDpSumFactory(
      noise_multiplier=float(config.noise_multiplier),
      expected_clients_per_round=int(clients_per_round),
      bits=int(config.ddp_bits),
      l2_clip=config.initial_clip,
      mechanism='distributed_skellam',
      rotation_type=config.ddp_rotation,
      auto_l2_clip=True,
      auto_l2_target_quantile=config.target_unclipped_quantile,
      auto_l2_lr=config.clip_learning_rate,
      auto_l2_clip_count_stddev=clipped_count_stddev(config, clients_per_round),
  )
  return tff.aggregators.UnweightedMeanFactory(
      value_sum_factory=sum_factory,
      count_sum_factory=tff.aggregators.SecureSumFactory(
          upper_bound_threshold=1, lower_bound_threshold=0))


def _with_zeroing(inner, secure: bool):
  """`tff.learning.dp_aggregator`-style adaptive zeroing around `inner`."""
  zeroing_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
      initial_estimate=10.0,
      target_quantile=0.98,
      learning_rate=math.log(10.0),
      multiplier=2.0,
      increment=1.0,
      secure_estimation=secure,
  )
  if not secure:
    return tff.aggregators.zeroing_factory(zeroing_norm, inner)
  return tff.aggregators.zeroing_factory(
      zeroing_norm, inner,
      zeroed_count_sum_factory=tff.aggregators.SecureSumFactory(
          upper_bound_threshold=1, lower_bound_threshold=0))


QUERY_MODES = ('gaussian_fixed', 'gaussian_adaptive')


def build_query(config: DpConfig, clients_per_round: int) -> tfp.DPQuery:
  """The normalized DP query behind the central Gaussian modes.

  The same queries TFF's `DifferentiallyPrivateFactory.gaussian_fixed` /
  `gaussian_adaptive` wrap; exposed so compressed transport can sit inside
  the clip (`compression.comm.build_compression_aggregator(dp_query=...)`).

  Args:
    config: A `gaussian_fixed` or `gaussian_adaptive` config with its noise
      multiplier set.
    clients_per_round: Clients summed per round (the query averages over it).

  Returns:
    A `tfp.DPQuery` (normalized by `clients_per_round`).

  Raises:
    ValueError: Another mode, or no noise multiplier.
  """
  if config.mode not in QUERY_MODES:
    raise ValueError(f'build_query supports modes {QUERY_MODES}, not {config.mode!r}')
  if config.noise_multiplier is None:
    raise ValueError('build_query needs noise_multiplier (calibrate it first)')
  cpr = _integer('clients_per_round', clients_per_round, 1)
  nm = float(config.noise_multiplier)
  if config.mode == 'gaussian_fixed':
    query = tfp.GaussianSumQuery(l2_norm_clip=config.initial_clip, stddev=config.initial_clip * nm)
  else:
    query = tfp.QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=config.initial_clip,
        noise_multiplier=value_noise_multiplier(config, cpr),
        target_unclipped_quantile=float(config.target_unclipped_quantile),
        learning_rate=float(config.clip_learning_rate),
        clipped_count_stddev=clipped_count_stddev(config, cpr),
        expected_num_records=cpr,
        geometric_update=True,
    )
  return tfp.NormalizedQuery(query, denominator=cpr)


def build_aggregator(
    config: DpConfig,
    clients_per_round: int,
    restart_rounds: Optional[int] = None,
) -> Optional[tff.aggregators.UnweightedAggregationFactory]:
  """The unweighted DP factory of `config` (None for mode 'none').

  Args:
    config: The DP configuration; `config.noise_multiplier` must be set
      (calibrate first).
    clients_per_round: Clients per round (the sum is averaged over it).
    restart_rounds: Tree modes: rounds between tree restarts (default
      `config.restart_rounds`).

  Returns:
    A TFF unweighted aggregation factory, or None when DP is off.

  Raises:
    ValueError: No noise multiplier, a bad count, or a tree mode without
      restart rounds.
  """
  if not config.enabled:
    return None
  if config.noise_multiplier is None:
    raise ValueError('build_aggregator needs noise_multiplier (calibrate it first)')
  cpr = _integer('clients_per_round', clients_per_round, 1)
  nm = float(config.noise_multiplier)
  if config.mode == 'gaussian_fixed':
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        nm, float(cpr), config.initial_clip)
  elif config.mode == 'gaussian_adaptive':
    value_noise_multiplier(config, cpr)  # Raises a clear error if nm is too large.
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        nm, float(cpr),
        initial_l2_norm_clip=config.initial_clip,
        target_unclipped_quantile=float(config.target_unclipped_quantile),
        learning_rate=float(config.clip_learning_rate),
        clipped_count_stddev=clipped_count_stddev(config, cpr))
  elif config.mode in TREE_MODES:
    restart = restart_rounds or config.restart_rounds
    if restart is None:
      raise ValueError(f'mode={config.mode!r} needs restart_rounds')
    value_noise_multiplier(config, cpr)
    factory = _TreeFactory(config, cpr, restart)
  else:  # ddp
    value_noise_multiplier(config, cpr)
    factory = _ddp_factory(config, cpr)
  if config.zeroing:
    factory = _with_zeroing(factory, secure=config.mode == 'ddp')
  return factory
