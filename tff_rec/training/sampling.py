"""Seeded per-round client selection (the sampling the DP accountant assumes)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tff_rec.data import federated

SAMPLING_MODES = ('fixed_size', 'poisson', 'shuffled_epochs')


class ClientSampler:
  """Picks each round's clients, reproducibly from (seed, round number).

  - `fixed_size`: `clients_per_round` users uniformly without replacement
    (all users when it equals the population);
  - `poisson`: each user independently with probability
    `clients_per_round / population` (the round may be empty-sized);
  - `shuffled_epochs`: each user at most once per epoch (DP-FTRL's
    assumption). Epoch e covers rounds e*L+1 .. (e+1)*L with
    L = ceil(population / clients_per_round); its rounds take consecutive
    blocks of a permutation of the users drawn from (seed, e); the last block
    may be smaller. Rounds are 1-based, as in `run_training_process`.
  Returned ids carry the round number so client data reshuffle each round.
  """

  def __init__(self, users: Sequence[int], clients_per_round: int, seed: int,
               mode: str = 'fixed_size'):
    if mode not in SAMPLING_MODES:
      raise ValueError(f'unknown sampling {mode!r}; valid: {", ".join(SAMPLING_MODES)}')
    self.users = np.asarray(users, dtype=np.int64)
    if len(self.users) == 0:
      raise ValueError('no users to sample from')
    if not 0 < clients_per_round <= len(self.users):
      raise ValueError(
          f'clients_per_round={clients_per_round} must be in [1, {len(self.users)}] '
          '(the number of training users)'
      )
    self.clients_per_round = int(clients_per_round)
    self.seed = int(seed)
    self.mode = mode

  @property
  def population(self) -> int:
    return len(self.users)

  @property
  def sampling_probability(self) -> float:
    return self.clients_per_round / self.population

  @property
  def epoch_rounds(self) -> int:
    """Rounds per epoch of `shuffled_epochs` sampling."""
    return -(-self.population // self.clients_per_round)

  def users_for_round(self, round_num: int) -> np.ndarray:
    """Dense user indices selected at `round_num` (sorted)."""
    if self.mode == 'shuffled_epochs':
      if round_num < 1:
        raise ValueError(f'rounds are 1-based, got {round_num}')
      epoch, position = divmod(int(round_num) - 1, self.epoch_rounds)
      perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.users)
      start = position * self.clients_per_round
      return np.sort(perm[start:start + self.clients_per_round])
    rng = np.random.default_rng([self.seed, int(round_num)])
    if self.mode == 'poisson':
      chosen = self.users[rng.random(self.population) < self.sampling_probability]
    elif self.clients_per_round == self.population:
      chosen = self.users
    else:
      chosen = rng.choice(self.users, size=self.clients_per_round, replace=False)
    return np.sort(chosen)

  def __call__(self, round_num: int) -> list[str]:
    return [federated.client_id(u, round_num) for u in self.users_for_round(round_num)]
