"""The --dp* flags of federated training binaries and their DpConfig.

  from experiments import dp_flags
  dp_flags.define_dp_flags()
  ...
  dp_config = dp_flags.dp_config_from_flags()            # app.UsageError if invalid
  config, dp = dp_flags.prepare_dp_for_run(dp_config, config, split)

See privacy/federated_dp.py for what the guarantee covers.
"""

from __future__ import annotations

from typing import Any

from absl import app
from absl import flags

from privacy import accounting
from privacy import dp_aggregators
from privacy import federated_dp
from privacy import secure_rounds

FLAGS = flags.FLAGS

# Flag name of each DpConfig field (for error messages).
FLAG_OF_FIELD = {
    'mode': 'dp',
    'noise_multiplier': 'dp_noise_multiplier',
    'clip': 'dp_clip',
    'target_unclipped_quantile': 'dp_target_unclipped_quantile',
    'clip_learning_rate': 'dp_clip_learning_rate',
    'zeroing': 'dp_zeroing',
    'delta': 'dp_delta',
    'target_epsilon': 'target_epsilon',
    'on_budget': 'dp_on_budget',
    'accountant': 'dp_accountant',
    'restart_rounds': 'dp_restart_rounds',
    'ddp_bits': 'ddp_bits',
}


def define_dp_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the DP flags in `flag_values` (a no-op if already defined)."""
  if 'dp' in flag_values:
    return
  fv = {'flag_values': flag_values}
  flags.DEFINE_enum('dp', 'none', list(dp_aggregators.MODES),
                    'User-level DP: none, gaussian_fixed (DP-FedAvg), gaussian_adaptive '
                    '(adaptive clip), tree / tree_adaptive (DP-FTRL, needs '
                    f'--sampling={federated_dp.EPOCH_SAMPLING}), ddp (distributed DP with '
                    'secure aggregation, needs --sampling=fixed_size). Needs --weighting=uniform.', **fv)
  flags.DEFINE_float('dp_noise_multiplier', None,
                     'Noise std / clip norm. Omit (with --target_epsilon) to calibrate it.', **fv)
  flags.DEFINE_float('dp_clip', None,
                     'L2 clip norm of a client update (the initial clip for adaptive modes, '
                     f'default {dp_aggregators.DEFAULT_INITIAL_CLIP} there).', **fv)
  flags.DEFINE_float('dp_target_unclipped_quantile', 0.5,
                     'Adaptive clip: quantile of update norms to track.', **fv)
  flags.DEFINE_float('dp_clip_learning_rate', 0.2, 'Adaptive clip: geometric learning rate.', **fv)
  flags.DEFINE_bool('dp_zeroing', False,
                    'Zero out updates with very large norm (its threshold is not private).', **fv)
  flags.DEFINE_float('dp_delta', None, 'Target delta (default 1 / population**1.1).', **fv)
  flags.DEFINE_float('target_epsilon', None, 'Privacy budget (user-level epsilon).', **fv)
  flags.DEFINE_enum('dp_on_budget', 'refuse', list(dp_aggregators.ON_BUDGET),
                    'If the planned rounds exceed --target_epsilon: refuse to start, or '
                    'stop after the last round within budget.', **fv)
  flags.DEFINE_enum('dp_accountant', 'rdp', list(dp_aggregators.ACCOUNTANTS),
                    'Privacy accountant (pld: Poisson sampling only).', **fv)
  flags.DEFINE_integer('dp_restart_rounds', None,
                       'Tree modes: restart the tree every N rounds (a divisor of the epoch '
                       'length; default once per epoch).', **fv)
  flags.DEFINE_integer('ddp_bits', 20, 'ddp: secure aggregation bit width (1..22).', **fv)
  flags.DEFINE_enum('secure_aggregation', 'none', list(secure_rounds.MODES),
                    "How --dp=ddp's secure sums run: none (TFF's simulated intrinsic, a plain "
                    'sum the server-side code sees), secagg (SecAgg, Bonawitz et al. 2017), '
                    'secagg_plus (SecAgg+, Bell et al. 2020) or he (BFV encryption, key-holder '
                    'decryption). See privacy/secure_rounds.py.', **fv)
  flags.DEFINE_float('secagg_threshold', 2 / 3,
                     'secagg/secagg_plus: Shamir threshold as a share of a neighbourhood, '
                     'in (0.5, 1].', **fv)
  flags.DEFINE_integer('secagg_degree', None,
                       'secagg_plus: even degree of the Harary graph (default 2 round(1.5 log2 '
                       'clients_per_round)).', **fv)
  flags.DEFINE_float('secagg_dropout', 0.0,
                     'secagg/secagg_plus/he: share of each round\'s clients that drop out before '
                     'sending their masked input (simulated; their DP noise is lost, see README).',
                     **fv)
  flags.DEFINE_bool('secagg_verify', False,
                    'secagg/secagg_plus/he: the driver also sums the clients\' vectors in the '
                    'clear and stops unless the protocol\'s sum is identical (audits and '
                    'benchmarks; a deployment would not).', **fv)


def _field_flag(message: str) -> str:
  """The flag whose DpConfig field a ValueError message starts with."""
  for field, flag in sorted(FLAG_OF_FIELD.items(), key=lambda kv: -len(kv[0])):
    if message.startswith(field):
      return f'--{flag}'
  return '--dp*'


def dp_config_from_flags(flag_values: flags.FlagValues = FLAGS) -> dp_aggregators.DpConfig:
  """DpConfig from the flags; app.UsageError naming the flag if invalid."""
  v = flag_values
  if v.dp == 'none':
    for flag in FLAG_OF_FIELD.values():
      if flag != 'dp' and v[flag].present:
        raise app.UsageError(f'--{flag} needs --dp (one of {list(dp_aggregators.MODES[1:])})')
    return dp_aggregators.DpConfig()
  if v.dp_noise_multiplier is not None and v.dp_noise_multiplier < 0:
    raise app.UsageError(f'--dp_noise_multiplier must be >= 0, got {v.dp_noise_multiplier}')
  if v.dp_noise_multiplier is None and v.target_epsilon is None:
    raise app.UsageError(f'--dp={v.dp} needs --dp_noise_multiplier or --target_epsilon '
                         '(to calibrate the noise)')
  if v.dp_clip is None and v.dp not in dp_aggregators.ADAPTIVE_MODES:
    raise app.UsageError(f'--dp={v.dp} needs --dp_clip (L2 clip norm of a client update)')
  if v.dp_restart_rounds is not None and v.dp not in dp_aggregators.TREE_MODES:
    raise app.UsageError('--dp_restart_rounds needs --dp=tree or --dp=tree_adaptive')
  try:
    return dp_aggregators.DpConfig(
        mode=v.dp,
        noise_multiplier=v.dp_noise_multiplier,
        clip=v.dp_clip,
        target_unclipped_quantile=v.dp_target_unclipped_quantile,
        clip_learning_rate=v.dp_clip_learning_rate,
        zeroing=v.dp_zeroing,
        delta=v.dp_delta,
        target_epsilon=v.target_epsilon,
        on_budget=v.dp_on_budget,
        accountant=v.dp_accountant,
        restart_rounds=v.dp_restart_rounds,
        ddp_bits=v.ddp_bits,
    )
  except ValueError as e:
    raise app.UsageError(f'{_field_flag(str(e))}: {e}') from e


SECAGG_FLAGS = ('secagg_threshold', 'secagg_degree', 'secagg_dropout', 'secagg_verify')


def secure_aggregation_from_flags(
    dp_config: dp_aggregators.DpConfig, seed: int = 0,
    flag_values: flags.FlagValues = FLAGS) -> secure_rounds.SecureAggregationConfig:
  """SecureAggregationConfig from the flags; app.UsageError naming the flag if invalid.

  Args:
    dp_config: The run's DP (a protocol needs --dp=ddp, whose sums are secure sums).
    seed: The run's --seed (dropout draws and SecAgg+ graphs follow it).
    flag_values: The flags.
  """
  v = flag_values
  if v.secure_aggregation == 'none':
    for flag in SECAGG_FLAGS:
      if v[flag].present:
        raise app.UsageError(f'--{flag} needs --secure_aggregation (one of '
                             f'{list(secure_rounds.MODES[1:])})')
    return secure_rounds.SecureAggregationConfig()
  if dp_config.mode != 'ddp':
    raise app.UsageError(
        f'--secure_aggregation={v.secure_aggregation} needs --dp=ddp: only distributed DP sends '
        f'the integer vectors a secure sum adds (got --dp={dp_config.mode})')
  if v.secagg_degree is not None and v.secure_aggregation != 'secagg_plus':
    raise app.UsageError('--secagg_degree needs --secure_aggregation=secagg_plus')
  if v['secagg_threshold'].present and v.secure_aggregation == 'he':
    raise app.UsageError('--secagg_threshold is for secagg/secagg_plus (he has no shares)')
  try:
    return secure_rounds.SecureAggregationConfig(
        mode=v.secure_aggregation, threshold=v.secagg_threshold, degree=v.secagg_degree,
        dropout=v.secagg_dropout, seed=seed, verify=v.secagg_verify)
  except ValueError as e:
    message = str(e)
    raise app.UsageError(message if message.startswith('--') else
                         f'--secure_aggregation: {message}') from e


def prepare_dp_for_run(dp_config: dp_aggregators.DpConfig, config: Any,
                       split: Any) -> tuple[Any, federated_dp.DpSetup]:
  """`run_setup.prepare_dp` for the flags; UsageError naming the flag if refused."""
  from experiments import run_setup  # pylint: disable=g-import-not-at-top

  try:
    return run_setup.prepare_dp(dp_config, config, split)
  except run_setup.RunSetupError as e:
    raise app.UsageError(str(e)) from e


def prepare_personalized_dp_for_run(dp_config: dp_aggregators.DpConfig, *,
                                    clients_per_round: Any, population: int,
                                    rounds: int) -> federated_dp.DpSetup:
  """`federated_dp.prepare_personalized_dp` for a binary: UsageError naming the flag if refused.

  Args:
    dp_config: The DP choice (`dp_config_from_flags`).
    clients_per_round: Participants per round (None: every user).
    population: The number of users.
    rounds: The rounds asked for (`--rounds`).

  Returns:
    The `federated_dp.DpSetup`.
  """
  try:
    return federated_dp.prepare_personalized_dp(
        dp_config, clients_per_round=clients_per_round, population=population,
        total_rounds=rounds)
  except accounting.BudgetExceededError as e:
    raise app.UsageError(
        f'--target_epsilon={dp_config.target_epsilon} with --rounds={rounds}: {e} (use '
        '--dp_on_budget=stop to run only those rounds, or raise --dp_noise_multiplier)') from e
  except ValueError as e:
    message = str(e)
    raise app.UsageError(message if message.startswith('--') else
                         f'--dp={dp_config.mode}: {message}') from e
