"""Prints the user-level (epsilon, delta) of a planned DP training run.

No training happens. Examples (from the repository root):

  # epsilon of a plan, both accountants:
  python -m experiments.compute_epsilon --dataset=ml-100k \
      --clients_per_round=100 --total_rounds=500 --noise_multiplier=1.0 \
      --accountant=both
  # noise multiplier for a budget (no --noise_multiplier):
  python -m experiments.compute_epsilon --dataset=ml-1m \
      --clients_per_round=200 --total_rounds=1000 --target_epsilon=5
  # max rounds within a budget (both given):
  python -m experiments.compute_epsilon --population=6040 \
      --clients_per_round=200 --noise_multiplier=1.0 --target_epsilon=5

See privacy/accounting.py for what the guarantee covers.
"""

import math
from typing import List, Optional, Sequence

from absl import app
from absl import flags

from experiments import common_flags
from privacy import accounting
from tff_rec import atomic

FLAGS = flags.FLAGS

# Users in the MovieLens releases (the population when one client = one user).
DATASET_POPULATIONS = {'ml-100k': 943, 'ml-1m': 6040}

flags.DEFINE_float(
    'noise_multiplier', None,
    'Noise std / clip norm. Omit (with --target_epsilon) to calibrate it.')
flags.DEFINE_integer(
    'clients_per_round', None, 'Clients (users) per round; expected number for '
    'Poisson sampling.', lower_bound=1)
flags.DEFINE_integer(
    'population', None, 'Number of users. Wins over --dataset.', lower_bound=1)
flags.DEFINE_enum(
    'dataset', None, sorted(DATASET_POPULATIONS),
    'Dataset whose user count is the population (if --population is unset).')
flags.DEFINE_integer(
    'total_rounds', None, 'Planned number of training rounds.', lower_bound=1)
flags.DEFINE_float(
    'delta', None, 'Target delta; default 1 / population**1.1.')
flags.DEFINE_enum(
    'sampling', 'poisson', list(accounting.SAMPLINGS),
    'Client sampling for --dp_mode=gaussian.')
flags.DEFINE_enum(
    'accountant', 'rdp', ['rdp', 'pld', 'both'], 'Privacy accountant.')
flags.DEFINE_enum(
    'dp_mode', 'gaussian', ['gaussian', 'tree'],
    'gaussian: DP-FedAvg with sampling; tree: DP-FTRL tree aggregation.')
flags.DEFINE_integer(
    'restart_rounds', None, '--dp_mode=tree: restart the tree every this many '
    'rounds (a divisor of the epoch length); default once per epoch.',
    lower_bound=1)
flags.DEFINE_float(
    'target_epsilon', None, 'Privacy budget: without --noise_multiplier, '
    'calibrate it; with it, print the max rounds within the budget.')
flags.DEFINE_string(
    'output_json', None, 'Also write the result as JSON to this path.')


def resolve_population(population: Optional[int],
                       dataset: Optional[str]) -> Optional[int]:
  """--population if set, else the user count of --dataset, else None."""
  if population is not None:
    return population
  if dataset is not None:
    return DATASET_POPULATIONS[dataset]
  return None


def accountant_list(accountant: str) -> List[str]:
  """['rdp'], ['pld'] or both."""
  return list(accounting.ACCOUNTANTS) if accountant == 'both' else [accountant]


def _positive_or_none(value: Optional[float]) -> bool:
  return value is None or (math.isfinite(value) and value > 0)


flags.register_validator('noise_multiplier', _positive_or_none,
                         '--noise_multiplier must be a finite number > 0')
flags.register_validator('target_epsilon', _positive_or_none,
                         '--target_epsilon must be a finite number > 0')
flags.register_validator('delta', lambda d: d is None or 0 < d < 1,
                         '--delta must be in (0, 1)')


@flags.multi_flags_validator(['clients_per_round', 'population', 'dataset'])
def _check_population(values) -> bool:
  population = resolve_population(values['population'], values['dataset'])
  if population is None:
    raise flags.ValidationError('give --population or --dataset')
  cpr = values['clients_per_round']
  if cpr is not None and cpr > population:
    raise flags.ValidationError(
        f'--clients_per_round ({cpr}) must be <= the population ({population}, '
        f'from --population/--dataset)')
  return True


@flags.multi_flags_validator(['noise_multiplier', 'target_epsilon',
                              'total_rounds'])
def _check_mode(values) -> bool:
  nm, target = values['noise_multiplier'], values['target_epsilon']
  if nm is None and target is None:
    raise flags.ValidationError('give --noise_multiplier, --target_epsilon or '
                                'both')
  if values['total_rounds'] is None and (nm is None or target is None):
    raise flags.ValidationError(
        '--total_rounds is required unless both --noise_multiplier and '
        '--target_epsilon are given')
  return True


@flags.multi_flags_validator(['accountant', 'sampling', 'dp_mode'])
def _check_accountant(values) -> bool:
  for a in accountant_list(values['accountant']):
    try:
      accounting.check_supported(a, values['sampling'], values['dp_mode'])
    except ValueError as e:
      raise flags.ValidationError(
          f'--accountant={values["accountant"]} with --sampling='
          f'{values["sampling"]} --dp_mode={values["dp_mode"]}: {e}') from e
  return True


@flags.multi_flags_validator(['restart_rounds', 'dp_mode', 'clients_per_round',
                              'population', 'dataset'])
def _check_restart_rounds(values) -> bool:
  restart = values['restart_rounds']
  if restart is None:
    return True
  if values['dp_mode'] != 'tree':
    raise flags.ValidationError('--restart_rounds needs --dp_mode=tree')
  population = resolve_population(values['population'], values['dataset'])
  cpr = values['clients_per_round']
  if population is None or cpr is None or cpr > population:
    return True  # Reported by the other validators.
  try:
    accounting.check_restart_rounds(restart, cpr, population)
  except ValueError as e:
    raise flags.ValidationError(f'--{e}') from e
  return True


def format_report(report: dict) -> List[str]:
  """Human-readable lines for a `privacy_report` result."""
  if report['mechanism'] == 'tree':
    head = (f"DP-FTRL tree aggregation, epochs of {report['epoch_rounds']} rounds"
            f" (each user at most once per epoch), tree restarted every "
            f"{report['restart_rounds']} rounds")
  else:
    head = f"DP-FedAvg Gaussian, {report['sampling']} client sampling"
  lines = [
      f"{head}; user-level, adjacency {report['neighboring_relation']}",
      (f"population {report['population']}"
       + (f" ({report['dataset']})" if report.get('dataset') else '')
       + f", {report['clients_per_round']} clients/round "
       f"(q = {report['sampling_probability']:.4g}), rounds "
       f"{report['rounds'] if report['rounds'] is not None else '-'}, "
       f"delta = {report['delta']:.3g}"
       + (' (default 1/population^1.1)' if report.get('delta_is_default') else '')),
  ]
  if report['noise_multiplier'] is not None:
    lines.append(f"noise_multiplier = {report['noise_multiplier']:g}")
  if report['target_epsilon'] is not None:
    lines.append(f"target epsilon = {report['target_epsilon']:g}")
  for name, result in report['results'].items():
    parts = []
    if 'calibrated_noise_multiplier' in result:
      parts.append(f"calibrated noise_multiplier = "
                   f"{result['calibrated_noise_multiplier']:.6f}")
    if 'epsilon' in result:
      parts.append(f"epsilon = {result['epsilon']:.6g}")
    if 'within_budget' in result:
      parts.append('within budget' if result['within_budget'] else
                   'OVER BUDGET')
    if 'max_rounds_within_budget' in result:
      parts.append(f"max rounds within budget = "
                   f"{result['max_rounds_within_budget']}")
    lines.append(f"{name}: " + ', '.join(parts))
  return lines


def write_json_atomic(path: str, record: dict) -> None:
  """Writes `record` as JSON to `path` via a temporary sibling + os.replace."""
  atomic.write_json(path, record, inf_as_string=True, sort_keys=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  population = resolve_population(FLAGS.population, FLAGS.dataset)
  delta = (FLAGS.delta if FLAGS.delta is not None
           else accounting.default_delta(population))
  try:
    report = accounting.privacy_report(
        FLAGS.noise_multiplier, FLAGS.clients_per_round, population,
        FLAGS.total_rounds, delta, FLAGS.sampling,
        accountant_list(FLAGS.accountant), FLAGS.dp_mode,
        FLAGS.restart_rounds, FLAGS.target_epsilon)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  report['dataset'] = FLAGS.dataset if FLAGS.population is None else None
  report['delta_is_default'] = FLAGS.delta is None
  for line in format_report(report):
    print(line)
  if FLAGS.output_json:
    write_json_atomic(FLAGS.output_json, report)
    print(f'wrote {FLAGS.output_json}')


if __name__ == '__main__':
  flags.mark_flag_as_required('clients_per_round')
  common_flags.run(main)
