"""The federated training loop: TFF's `run_training_process` plus program state.

Per run directory:
  checkpoints/program_state_<round>/  TFF `FileProgramStateManager` (atomic)
  metrics.csv                         TFF `CSVFileReleaseManager`
  tensorboard/                        TFF `TensorBoardReleaseManager`
and a progress bar (round, loss, metric, ETA). Rerunning the same command
after a crash resumes from the newest intact checkpoint (each has a manifest
of file sizes and sha256; damaged or partial ones are moved to
checkpoints/incomplete/, see `checkpoints`); rows of metrics.csv past it are
replaced.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_federated as tff
import tqdm

from tff_rec.training import aggregators
from tff_rec.training import checkpoints

# Metric keys shown in the progress bar, first found wins.
_BAR_KEYS = (
    ('loss', ('client_work/train/loss',)),
    ('rmse', ('evaluation/root_mean_squared_error', 'client_work/train/root_mean_squared_error')),
    ('eps', ('dp/epsilon',)),
)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  total_rounds: int
  eval_every: int = 1
  checkpoint_every: int = 1
  keep_checkpoints: int = 3
  progress_bar: bool = True
  # Stop when more than this share of a round's clients sent non-finite
  # (zeroed) updates.
  max_zeroed_share: float = 0.5

  def __post_init__(self):
    for name in ('total_rounds', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if not 0.0 <= self.max_zeroed_share <= 1.0:
      raise ValueError(f'max_zeroed_share must be in [0, 1], got {self.max_zeroed_share}')


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = '') -> collections.OrderedDict:
  """Nested metrics as one level with '/'-joined keys and Python scalars."""
  out = collections.OrderedDict()
  for k, v in metrics.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, key + '/'))
    else:
      a = np.asarray(v)
      out[key] = a.item() if a.ndim == 0 else a.tolist()
  return out


class ProgressReleaseManager(tff.program.ReleaseManager):
  """A tqdm bar over rounds showing loss, a metric and the ETA."""

  def __init__(self, total_rounds: int, start_round: int = 0, enabled: bool = True):
    self._bar = tqdm.tqdm(
        total=total_rounds, initial=start_round, unit='round', disable=not enabled,
        dynamic_ncols=True, desc='training',
    )

  async def release(self, value, key) -> None:
    flat = flatten_metrics(value)
    shown = collections.OrderedDict()
    for label, candidates in _BAR_KEYS:
      for c in candidates:
        if c in flat and isinstance(flat[c], (int, float)):
          shown[label] = f'{flat[c]:.4f}'
          break
    self._bar.set_postfix(shown, refresh=False)
    if key > self._bar.n:
      self._bar.update(key - self._bar.n)

  def close(self) -> None:
    self._bar.close()


class FlatteningReleaseManager(tff.program.ReleaseManager):
  """Flattens nested metrics to '/'-joined keys before an inner manager."""

  def __init__(self, inner: tff.program.ReleaseManager):
    self._inner = inner

  async def release(self, value, key) -> None:
    await self._inner.release(flatten_metrics(value), key)


def _clean_partial_checkpoints(checkpoint_dir: str) -> None:
  """Removes temp directories a killed save left behind (never a complete one)."""
  for path in glob.glob(os.path.join(checkpoint_dir, '*_temp*')):
    logging.warning('Removing partial checkpoint %s', path)
    shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint_round(run_dir: str) -> Optional[int]:
  """The round of the newest intact (manifest-verified) checkpoint in `run_dir`, if any."""
  rounds = checkpoints.intact_rounds(os.path.join(run_dir, 'checkpoints'))
  return rounds[-1] if rounds else None


class NonFiniteTrainingError(RuntimeError):
  """A round diverged: its global model is not finite, or too many client updates were."""


class _GuardedProcess:
  """Wraps `process.next`: stops a diverging run, adds per-round metrics (e.g. running ε).

  After each round, before TFF checkpoints it: the global model must be
  finite, and at most `max_zeroed_share` of the clients may have sent an
  update TFF zeroed for being non-finite (counted by
  `aggregators.count_zeroed_updates`). Otherwise `NonFiniteTrainingError`
  stops the run with the last good checkpoint intact.
  """

  def __init__(self, process, checkpoint_dir: str, max_zeroed_share: float,
               extra_metrics_fn: Optional[Callable[[int], Mapping[str, Any]]] = None):
    self._process = process
    self._checkpoint_dir = checkpoint_dir
    self._max_zeroed_share = max_zeroed_share
    self._extra = extra_metrics_fn
    self._round = 0
    self.initialize = process.initialize

  def set_round(self, round_num: int) -> None:
    self._round = round_num
    if hasattr(self._process, 'set_round'):  # E.g. secure rounds seed their dropouts by round.
      self._process.set_round(round_num)

  def _stop(self, what: str) -> NonFiniteTrainingError:
    good = checkpoints.intact_rounds(self._checkpoint_dir)
    last = (f'the last good checkpoint is round {good[-1]} in {self._checkpoint_dir}' if good
            else 'there is no checkpoint yet')
    return NonFiniteTrainingError(
        f'round {self._round}: {what}. Training stopped before this round was saved; {last}. '
        'Lower the learning rates (or clip the updates) and rerun to resume from it.')

  def next(self, state, data):
    output = self._process.next(state, data)
    metrics = collections.OrderedDict(output.metrics)
    counts = metrics.get('aggregator', {})
    if isinstance(counts, Mapping) and aggregators.ZEROED_KEY in counts:
      zeroed, clients = int(counts[aggregators.ZEROED_KEY]), int(counts[aggregators.CLIENTS_KEY])
      if clients and zeroed / clients > self._max_zeroed_share:
        raise self._stop(f'{zeroed} of {clients} client updates were not finite and were zeroed '
                         f'(more than max_zeroed_share={self._max_zeroed_share:g})')
    weights = self._process.get_model_weights(output.state)
    for name, values in (('trainable', weights.trainable), ('non-trainable', weights.non_trainable)):
      for k, w in enumerate(values):
        if not np.all(np.isfinite(np.asarray(w))):
          raise self._stop(f'the global model is not finite ({name} weight {k}, shape '
                           f'{np.shape(w)})')
    if self._extra is not None:
      metrics.update(self._extra(self._round))
    return tff.learning.templates.LearningProcessOutput(output.state, metrics)


def run(
    process: tff.learning.templates.LearningProcess,
    training_selection_fn: Callable[[int], Sequence[str]],
    run_dir: str,
    config: LoopConfig,
    evaluation_fn: Optional[Callable[[Any, Sequence[str]], Mapping[str, Any]]] = None,
    evaluation_selection_fn: Optional[Callable[[int], Sequence[str]]] = None,
    extra_metrics_fn: Optional[Callable[[int], Mapping[str, Any]]] = None,
) -> Any:
  """Runs (or resumes) training for `config.total_rounds`; returns the final state."""
  checkpoint_dir = os.path.join(run_dir, 'checkpoints')
  os.makedirs(checkpoint_dir, exist_ok=True)
  _clean_partial_checkpoints(checkpoint_dir)
  checkpoints.set_aside_damaged(checkpoint_dir)
  start = latest_checkpoint_round(run_dir) or 0
  if start:
    logging.warning('Resuming %s from the checkpoint of round %d', run_dir, start)
  state_manager = checkpoints.VerifiedProgramStateManager(
      root_dir=checkpoint_dir, prefix=checkpoints.PREFIX, keep_total=config.keep_checkpoints
  )
  csv_manager = FlatteningReleaseManager(
      tff.program.CSVFileReleaseManager(
          file_path=os.path.join(run_dir, 'metrics.csv'), key_fieldname='round_num'
      )
  )
  tb_manager = FlatteningReleaseManager(
      tff.program.TensorBoardReleaseManager(summary_dir=os.path.join(run_dir, 'tensorboard'))
  )
  progress = ProgressReleaseManager(config.total_rounds, start, enabled=config.progress_bar)

  training_process = _GuardedProcess(process, checkpoint_dir, config.max_zeroed_share,
                                     extra_metrics_fn)

  def selection_fn(round_num):
    training_process.set_round(round_num)
    return training_selection_fn(round_num)

  eval_fn = None
  if evaluation_fn is not None:
    def eval_fn(state, data):
      return collections.OrderedDict(evaluation_fn(process.get_model_weights(state), data))

  started = time.time()
  try:
    state = tff.simulation.run_training_process(
        training_process=training_process,
        training_selection_fn=selection_fn,
        total_rounds=config.total_rounds,
        evaluation_fn=eval_fn,
        evaluation_selection_fn=evaluation_selection_fn if eval_fn else None,
        rounds_per_evaluation=config.eval_every,
        program_state_manager=state_manager,
        rounds_per_saving_program_state=config.checkpoint_every,
        metrics_managers=[csv_manager, tb_manager, progress],
    )
  finally:
    progress.close()
  logging.info('Training ran %d rounds in %.1fs', config.total_rounds - start, time.time() - started)
  return state
