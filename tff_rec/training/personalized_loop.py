"""The round loop of personalized federated recommenders (PFedRec, ...), with resume.

A round: draw the participants and their fresh training negatives under the
protocol (`fedrec_protocol`), read each participant's device state from the
`DeviceStateStore`, run the process's `next`, write the returned
CLIENTS-placed states back under the client ids, then save the server state.
Both are keyed by round and verified on read, and a run directory resumes
from the newest round whose server checkpoint and device states are both
intact (device states are written first, so a crash between them re-runs
that round). Randomness is `np.random.default_rng([seed, round])`, so a
resumed run equals an uninterrupted one.

The reported score follows the reference (PFedRec train.py:120-124): the
test metrics of the round with the best validation HR@k, later rounds
winning ties.

Written here rather than on `tff.program` (as `training.loop` is) because
the program's state is SERVER-placed only, and these processes also thread
per-client state through every round.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow as tf
import tqdm

from tff_rec import atomic
from tff_rec.data import fedrec_protocol
from tff_rec.training import device_state
from tff_rec.training import run_dir as run_dir_lib



@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Rounds, participation and protocol.

  Attributes:
    rounds: Total rounds (100 in PFedRec's train.py).
    protocol: 'as_published' or 'leak_free' (see `fedrec_protocol`).
    clients_per_round: Participants per round, drawn uniformly without
      replacement; None for everyone (`clients_sample_ratio=1.0`). Metrics
      are those of the round's participants.
    negatives_per_positive: Fresh training negatives per positive.
    seed: Seeds participation and negatives (with the round number).
  """

  rounds: int = 100
  protocol: str = 'as_published'
  clients_per_round: Optional[int] = None
  negatives_per_positive: int = fedrec_protocol.TRAIN_NEGATIVES
  seed: int = 0

  def __post_init__(self):
    fedrec_protocol.check_protocol(self.protocol)
    if self.rounds <= 0:
      raise ValueError(f'rounds must be positive, got {self.rounds}')
    if self.clients_per_round is not None and self.clients_per_round <= 0:
      raise ValueError(f'clients_per_round must be positive, got {self.clients_per_round}')
    if self.negatives_per_positive <= 0:
      raise ValueError(f'negatives_per_positive must be positive, got {self.negatives_per_positive}')


@dataclasses.dataclass(frozen=True)
class LoopResult:
  """What a run reports.

  Attributes:
    best_round: 1-based round with the best validation HR (ties: later).
    best: the metrics of that round (val_*, test_*, *_full_*).
    history: per round, the process's training metrics plus `round` and
      `seconds`.
    rounds_run: rounds run in this call (0 when the run was complete).
  """

  best_round: int
  best: Mapping[str, float]
  history: list
  rounds_run: int

  @property
  def seconds_per_round(self) -> float:
    times = [h['seconds'] for h in self.history[1:]] or [h['seconds'] for h in self.history]
    return float(np.median(times))


def client_inputs(data: fedrec_protocol.FedRecData, users: np.ndarray,
                  examples: fedrec_protocol.RoundExamples, states: list) -> list:
  """Each participant's `OrderedDict(personal, data)` for the process."""
  out = []
  for k, u in enumerate(users.tolist()):
    items, labels = examples.of(k)
    personal = collections.OrderedDict((n, np.asarray(v, np.float32)) for n, v in states[k].items())
    out.append(collections.OrderedDict(personal=personal, data=collections.OrderedDict(
        items=items, labels=labels, train_items=data.train_items_of(u),
        val_item=np.int32(data.val_items[u]), val_negatives=data.val_negatives[u],
        test_item=np.int32(data.test_items[u]), test_negatives=data.test_negatives[u])))
  return out


class _ServerCheckpoints:
  """Server state after round r as `server_<r>.npz` (flattened leaves) + sha256."""

  def __init__(self, directory: str, keep: int = 2):
    self._files = device_state.RoundFiles(directory, 'server', keep)

  def rounds(self) -> list[int]:
    return self._files.rounds()

  def save(self, r: int, state: Any, history: list) -> None:
    leaves = tf.nest.flatten(state)
    buf = io.BytesIO()
    np.savez(buf, history=np.array(json.dumps(history, allow_nan=False)),
             **{f'leaf_{n:05d}': np.asarray(v) for n, v in enumerate(leaves)})
    self._files.write(r, buf.getvalue())

  def load(self, r: int, like: Any) -> Optional[tuple[Any, list]]:
    """(state, history) after round r, or None if missing or damaged."""
    try:
      data = self._files.read(r)
      with np.load(io.BytesIO(data), allow_pickle=False) as z:
        history = json.loads(str(z['history']))
        leaves = [z[f'leaf_{n:05d}'] for n in range(len(z.files) - 1)]
    except (OSError, ValueError, KeyError, IndexError):  # DeviceStateError is a ValueError
      return None
    template = tf.nest.flatten(like)
    if len(leaves) != len(template) or any(
        np.shape(a) != np.shape(b) for a, b in zip(leaves, template)):
      return None
    leaves = [np.asarray(a, np.asarray(b).dtype) for a, b in zip(leaves, template)]
    return tf.nest.pack_sequence_as(like, leaves), history


def _check_config(run_dir: str, description: Mapping[str, Any]) -> None:
  path = os.path.join(run_dir, 'config.json')
  text = json.dumps(description, sort_keys=True, indent=1, allow_nan=False, default=str)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old.strip() != text.strip():
      raise run_dir_lib.ConfigChangedError(
          f'{path}: this run directory was trained with a different configuration; use a new '
          f'--run_dir or restore the old settings.\nold: {old}\nnew: {text}')
  else:
    atomic.write(path, text + '\n')


def run(process, *, initial_personal: Mapping[str, np.ndarray],
        data: fedrec_protocol.FedRecData, config: LoopConfig, run_dir: str,
        description: Mapping[str, Any], progress: bool = True,
        on_round: Optional[Callable[[dict], None]] = None,
        round_metrics: Optional[Callable[[int], Mapping[str, float]]] = None) -> LoopResult:
  """Trains (or resumes) a personalized process and returns its best round.

  Args:
    process: A `tff.templates.IterativeProcess` whose `next(state, clients)`
      returns `OrderedDict(state, personal, metrics)` (e.g.
      `pfedrec.build_pfedrec`), with `metrics['train']` holding `val_hr`.
    initial_personal: A new device's state (leaf name -> array).
    data: The split.
    config: Rounds, participation and protocol.
    run_dir: Where checkpoints, device states and `history.json` go.
    description: Everything that defines the result (algorithm, its
      hyperparameters, data); a run directory refuses a different one.
    progress: Show a progress bar.
    on_round: Called with each round's history row.
    round_metrics: `round -> {name: value}` added to that round's history
      row (e.g. the DP accountant's `dp/epsilon` after the round).

  Returns:
    `LoopResult`.

  Raises:
    ConfigChangedError: `run_dir` holds a run of another configuration.
    FloatingPointError: a round's metrics are not finite.
  """
  with run_dir_lib.lock(run_dir):
    # Everything but the number of rounds: a run may be continued to more.
    loop_fields = {k: v for k, v in dataclasses.asdict(config).items() if k != 'rounds'}
    _check_config(run_dir, dict(description, loop=loop_fields, data=data.summary(),
                                data_seed=data.seed))
    store = device_state.DeviceStateStore(os.path.join(run_dir, 'devices'), initial_personal)
    ckpts = _ServerCheckpoints(os.path.join(run_dir, 'checkpoints'))
    state = process.initialize()
    history: list = []
    start = 0
    device_rounds = set(store.rounds())
    for r in reversed(ckpts.rounds()):
      if r not in device_rounds or not store.intact(r):
        continue
      loaded = ckpts.load(r, state)
      if loaded is not None:
        state, history = loaded
        start = r
        break
    if start > config.rounds:
      raise ValueError(f'{run_dir} already has {start} rounds, more than the {config.rounds} '
                       'asked for; use a new run directory or at least that many rounds')
    all_users = np.arange(data.num_users)
    bar = tqdm.trange(start, config.rounds, desc=f'{description.get("algorithm", "rounds")}',
                      unit='round', disable=not progress, initial=start, total=config.rounds)
    for r in bar:
      t0 = time.perf_counter()
      rng = np.random.default_rng([config.seed, r])
      users = all_users
      if config.clients_per_round is not None and config.clients_per_round < data.num_users:
        users = np.sort(rng.choice(data.num_users, config.clients_per_round, replace=False))
      examples = fedrec_protocol.round_examples(
          data, config.protocol, rng, per_positive=config.negatives_per_positive, users=users)
      ids = [str(u) for u in users.tolist()]
      states = store.read(ids, r)
      out = process.next(state, client_inputs(data, users, examples, states))
      metrics = {k: float(v) for k, v in out['metrics']['train'].items()}
      bad = [k for k, v in metrics.items() if not np.isfinite(v)]
      if bad:
        raise FloatingPointError(f'round {r + 1}: non-finite metrics {bad}; nothing saved')
      store.write(r + 1, {cid: dict(s) for cid, s in zip(ids, out['personal'])})
      state = out['state']
      row = dict(round=r + 1, seconds=time.perf_counter() - t0, **metrics)
      if round_metrics is not None:
        row.update({k: float(v) for k, v in round_metrics(r + 1).items()})
      history.append(row)
      ckpts.save(r + 1, state, history)
      atomic.write_json(os.path.join(run_dir, 'history.json'), history)
      bar.set_postfix(loss=f'{metrics["loss"]:.4f}', val_hr=f'{metrics["val_hr"]:.4f}')
      if on_round is not None:
        on_round(row)
    best = None
    for row in history:
      if best is None or row['val_hr'] >= best['val_hr']:
        best = row
    return LoopResult(best_round=int(best['round']), best=best, history=history,
                      rounds_run=config.rounds - start)
