"""Time the DP accountant needs for 1000 rounds (privacy/accounting.py).

`compute_epsilon` composes a whole plan once (RDP and PLD); `EpsilonTracker`
reports epsilon after every round, as the training loop does. The PLD tracker
recomposes per round, so it runs under a time budget and the per-round cost
is extrapolated to all rounds (marked as such).
"""

from __future__ import annotations

import time
from typing import Optional

from benchmarks import common
from privacy import accounting

NAME = 'accountant_speed'


def _plan(rounds: int, sampling: str) -> accounting.DpPlan:
  # DP-FedAvg on ML-1M users: 100 of 6040 per round.
  return accounting.DpPlan(noise_multiplier=1.0, clients_per_round=100, population=6040,
                           rounds=rounds, delta=accounting.default_delta(6040), sampling=sampling)


def _tracker_run(plan: accounting.DpPlan, accountant: str, budget_seconds: Optional[float]) -> dict:
  start = time.perf_counter()
  tracker = accounting.EpsilonTracker.from_plan(plan, accountant)
  done, eps = 0, None
  for t in range(1, plan.rounds + 1):
    eps = tracker.epsilon_after(t)
    done = t
    if budget_seconds is not None and time.perf_counter() - start > budget_seconds:
      break
  seconds = time.perf_counter() - start
  row = {'rounds_done': done, 'seconds': seconds, 'ms_per_round': 1000 * seconds / done,
         'epsilon_at_last_round': eps}
  if done < plan.rounds:
    # Per-round cost grows with the round number for a recomposing accountant;
    # assume linear growth: total ~ seconds * (rounds / done) ** 2.
    row['extrapolated_seconds_for_all_rounds'] = seconds * (plan.rounds / done) ** 2
  return row


def run(out_dir: str, smoke: bool = False, rounds: Optional[int] = None,
        pld_tracker_budget_seconds: float = 60.0) -> str:
  """Times the accountant; writes accountant_speed.json/.md; the JSON path."""
  started = time.time()
  rounds = rounds or (20 if smoke else 1000)
  budget = 5.0 if smoke else pld_tracker_budget_seconds
  rows = []
  for sampling, accountant in (('poisson', 'rdp'), ('poisson', 'pld'), ('fixed_size', 'rdp')):
    plan = _plan(rounds, sampling)
    seconds, eps = common.timed(accounting.compute_epsilon, plan, accountant)
    rows.append({'what': 'compute_epsilon', 'sampling': sampling, 'accountant': accountant,
                 'rounds': rounds, 'seconds': seconds, 'epsilon': eps})
    tracked = _tracker_run(plan, accountant, budget if accountant == 'pld' else None)
    rows.append({'what': 'EpsilonTracker.epsilon_after every round', 'sampling': sampling,
                 'accountant': accountant, 'rounds': rounds, 'seconds': tracked['seconds'],
                 'epsilon': tracked['epsilon_at_last_round'], **tracked})
  parameters = {'rounds': rounds, 'noise_multiplier': 1.0, 'clients_per_round': 100,
                'population': 6040, 'delta': accounting.default_delta(6040),
                'pld_tracker_budget_seconds': budget, 'smoke': smoke,
                'pld_value_discretization_interval': accounting.PLD_VALUE_DISCRETIZATION_INTERVAL}
  md = '\n'.join([
      f'# DP accountant time for {rounds} rounds', '', common.machine_line(), '',
      common.markdown_table(rows, ['what', 'sampling', 'accountant', 'rounds_done', 'seconds',
                                   'ms_per_round', 'extrapolated_seconds_for_all_rounds',
                                   'epsilon']), ''])
  return common.write_result(out_dir, NAME, parameters, {'rows': rows}, md, started)
