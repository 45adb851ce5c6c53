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

_FILE_RE = re.compile(r'round_(\d+)\.npz$')
_IDS = '__client_ids__'


class DeviceStateError(ValueError):
  """A device-state file is missing, damaged or does not match the clients."""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class DeviceStateStore:
  """Device states of all clients, one verified file per round.

  Args:
    directory: Where the round files live (created if missing).
    initial: The state of a client that has not trained yet: leaf name ->
      array (the same for every client).
    keep: How many round files to keep (older ones are removed).
  """

  def __init__(self, directory: str, initial: Mapping[str, np.ndarray], *, keep: int = 2):
    if keep < 1:
      raise ValueError(f'keep must be >= 1, got {keep}')
    self._dir = directory
    self._initial = {k: np.asarray(v) for k, v in initial.items()}
    if _IDS in self._initial:
      raise ValueError(f'{_IDS} is reserved')
    self._keep = keep
    self._cache: Optional[tuple[int, dict]] = None
    os.makedirs(directory, exist_ok=True)

  @property
  def directory(self) -> str:
    return self._dir

  def rounds(self) -> list[int]:
    """Rounds with a state file, ascending."""
    out = []
    for path in glob.glob(os.path.join(self._dir, 'round_*.npz')):
      m = _FILE_RE.search(path)
      if m:
        out.append(int(m.group(1)))
    return sorted(out)

  def intact(self, round_num: int) -> bool:
    """Whether round `round_num`'s file exists and matches its checksum (0: always)."""
    if round_num == 0:
      return True
    try:
      self._load(round_num)
    except DeviceStateError:
      return False
    return True

  def _path(self, round_num: int) -> str:
    return os.path.join(self._dir, f'round_{round_num:06d}.npz')

  def _load(self, round_num: int) -> dict:
    if self._cache is not None and self._cache[0] == round_num:
      return self._cache[1]
    path = self._path(round_num)
    try:
      with open(path, 'rb') as f:
        data = f.read()
      with open(path + '.sha256') as f:
        expected = f.read().split()[0]
    except OSError as e:
      raise DeviceStateError(f'{path}: cannot read device states: {e}') from None
    if _sha256(data) != expected:
      raise DeviceStateError(f'{path}: sha256 does not match {path}.sha256 (damaged file)')
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
    data = buf.getvalue()
    path = self._path(round_num)
    atomic.write(path, data)
    atomic.write(path + '.sha256', _sha256(data) + '  ' + os.path.basename(path) + '\n')
    self._cache = None
    for old in self.rounds():
      if old <= round_num - self._keep or old > round_num:
        for p in (self._path(old), self._path(old) + '.sha256'):
          if os.path.exists(p):
            os.remove(p)
    return path
