"""Per-client state that stays on the device, stored on disk keyed by client id.

Personalized algorithms (PFedRec's score-function head, FedRAP's additive
item table) keep part of the model on each device across rounds. In
simulation that state comes back from the TFF computation as CLIENTS-placed
values and is written here, never into the server state or a server
checkpoint: each round's states are one file, `round_<r>.npz`, holding the
client ids and one array per state leaf with a row per client, written
atomically with a sha256 sidecar that every read checks. Clients that have
not taken part yet read the initial state.

Written here rather than with `tff.program` because TFF's program state
managers hold one SERVER value per version, not a keyed set of client values.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from tff_rec import atomic

_IDS = '__client_ids__'


class DeviceStateError(ValueError):
  """A device-state file is missing, damaged or does not match the clients."""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class RoundFiles:
  """`<prefix>_<round>.npz` files in a directory, each with a sha256 sidecar
  that every read checks; the newest `keep` rounds are kept."""

  def __init__(self, directory: str, prefix: str, keep: int = 2):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}')
    self._dir = directory
    self._prefix = prefix
    self._keep = keep
    self._re = re.compile(re.escape(prefix) + r'_(\d+)\.npz$')
    os.makedirs(directory, exist_ok=True)

  def path(self, round_num: int) -> str:
    return os.path.join(self._dir, f'{self._prefix}_{round_num:06d}.npz')

  def rounds(self) -> list[int]:
    """Rounds with a file, ascending."""
    found = (self._re.search(p) for p in glob.glob(os.path.join(self._dir, f'{self._prefix}_*.npz')))
    return sorted(int(m.group(1)) for m in found if m)

  def read(self, round_num: int) -> bytes:
    """The file's bytes; DeviceStateError if missing or not matching its sidecar."""
    path = self.path(round_num)
    try:
      with open(path, 'rb') as f:
        data = f.read()
      with open(path + '.sha256') as f:
        expected = f.read().split()[0]
    except (OSError, IndexError) as e:
      raise DeviceStateError(f'{path}: cannot read: {e}') from None
    if _sha256(data) != expected:
      raise DeviceStateError(f'{path}: sha256 does not match {path}.sha256 (damaged file)')
    return data

  def write(self, round_num: int, data: bytes) -> str:
    """Writes round `round_num` atomically with its sidecar, then drops rounds
    older than the kept ones and any later than it (a stale future). Returns the path."""
    path = self.path(round_num)
    atomic.write(path, data)
    atomic.write(path + '.sha256', _sha256(data) + '  ' + os.path.basename(path) + '\n')
    for old in self.rounds():
      if old <= round_num - self._keep or old > round_num:
        for p in (self.path(old), self.path(old) + '.sha256'):
          if os.path.exists(p):
            os.remove(p)
    return path


class DeviceStateStore:
  """Device states of all clients, one verified file per round.

  Args:
    directory: Where the round files live (created if missing).
    initial: The state of a client that has not trained yet: leaf name ->
      array (the same for every client).
    keep: How many round files to keep (older ones are removed).
  """

  def __init__(self, directory: str, initial: Mapping[str, np.ndarray], *, keep: int = 2):
    self._dir = directory
    self._files = RoundFiles(directory, 'round', keep)
    self._initial = {k: np.asarray(v) for k, v in initial.items()}
    if _IDS in self._initial:
      raise ValueError(f'{_IDS} is reserved')
    self._cache: Optional[tuple[int, dict]] = None

  @property
  def directory(self) -> str:
    return self._dir

  def rounds(self) -> list[int]:
    """Rounds with a state file, ascending."""
    return self._files.rounds()

  def intact(self, round_num: int) -> bool:
    """Whether round `round_num`'s file exists and matches its checksum (0: always)."""
    if round_num == 0:
      return True
    try:
      self._load(round_num)
    except DeviceStateError:
      return False
    return True

  def _load(self, round_num: int) -> dict:
    if self._cache is not None and self._cache[0] == round_num:
      return self._cache[1]
    path = self._files.path(round_num)
    data = self._files.read(round_num)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      table = {k: z[k] for k in z.files}
    ids = table[_IDS].tolist()
    if sorted(set(table) - {_IDS}) != sorted(self._initial):
      raise DeviceStateError(f'{path}: holds leaves {sorted(set(table) - {_IDS})}, expected '
                             f'{sorted(self._initial)}')
    table['__row__'] = {cid: n for n, cid in enumerate(ids)}
    self._cache = (round_num, table)
    return table

  def read(self, client_ids: Sequence[str], round_num: int) -> list[dict]:
    """Each client's state after `round_num` rounds (0: all initial)."""
    if round_num == 0:
      return [{k: v.copy() for k, v in self._initial.items()} for _ in client_ids]
    table = self._load(round_num)
    rows = table['__row__']
    out = []
    for cid in client_ids:
      n = rows.get(str(cid))
      if n is None:
        out.append({k: v.copy() for k, v in self._initial.items()})
      else:
        out.append({k: table[k][n] for k in self._initial})
    return out

  def write(self, round_num: int, updates: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Writes the states after `round_num`: the previous round's, with
    `updates` (client id -> state) applied. Returns the file's path."""
    if round_num < 1:
      raise ValueError(f'round_num must be >= 1, got {round_num}')
    prev = round_num - 1
    if prev and prev not in self.rounds():
      raise DeviceStateError(f'{self._dir}: no device states of round {prev} to update')
    if prev:
      base = self._load(prev)
      ids = list(base[_IDS].tolist())
      leaves = {k: base[k].copy() for k in self._initial}
    else:
      ids, leaves = [], {k: np.zeros((0,) + v.shape, v.dtype) for k, v in self._initial.items()}
    row = {cid: n for n, cid in enumerate(ids)}
    new_ids = [str(c) for c in updates if str(c) not in row]
    if new_ids:
      ids += new_ids
      for k, v in self._initial.items():
        leaves[k] = np.concatenate([leaves[k], np.repeat(v[None], len(new_ids), axis=0)])
      row = {cid: n for n, cid in enumerate(ids)}
    for cid, state in updates.items():
      if set(state) != set(self._initial):
        raise DeviceStateError(f'client {cid}: state has leaves {sorted(state)}, expected '
                               f'{sorted(self._initial)}')
      for k, v in state.items():
        v = np.asarray(v)
        if v.shape != self._initial[k].shape:
          raise DeviceStateError(f'client {cid}: {k} has shape {v.shape}, expected '
                                 f'{self._initial[k].shape}')
        if not np.all(np.isfinite(v)):
          raise DeviceStateError(f'client {cid}: {k} is not finite; not storing it')
        leaves[k][row[str(cid)]] = v
    buf = io.BytesIO()
    np.savez(buf, **{_IDS: np.array(ids, dtype=np.str_)}, **leaves)
    self._cache = None
    return self._files.write(round_num, buf.getvalue())
