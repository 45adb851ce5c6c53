"""The federated training loop: TFF's `run_training_process` plus program state.

Per run directory:
  checkpoints/program_state_<round>/  TFF `FileProgramStateManager` (atomic)
  metrics.csv                         TFF `CSVFileReleaseManager`
  tensorboard/                        TFF `TensorBoardReleaseManager`
and a progress bar (round, loss, metric, ETA). Rerunning the same command
after a crash resumes from the latest complete checkpoint (damaged ones are
moved to checkpoints/incomplete/); rows of metrics.csv past it are replaced.
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

  def __post_init__(self):
    for name in ('total_rounds', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')


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


def _checkpoint_rounds(checkpoint_dir: str) -> dict[int, str]:
  """Round -> path of every `program_state_<round>` directory."""
  rounds = {}
  for path in glob.glob(os.path.join(checkpoint_dir, 'program_state_*')):
    suffix = os.path.basename(path)[len('program_state_'):]
    if suffix.isdigit():
      rounds[int(suffix)] = path
  return rounds


def is_complete_checkpoint(path: str) -> bool:
  """Whether `path` holds a whole SavedModel (graph and variable index)."""
  return (os.path.isfile(os.path.join(path, 'saved_model.pb'))
          and os.path.isfile(os.path.join(path, 'variables', 'variables.index')))


def set_aside_incomplete_checkpoints(checkpoint_dir: str) -> list[str]:
  """Moves damaged checkpoints (e.g. files deleted) to `incomplete/`; returns their new paths.

  TFF loads the newest `program_state_<round>` and fails on a damaged one;
  moved aside, training resumes from the newest complete checkpoint instead.
  """
  moved = []
  for round_num, path in sorted(_checkpoint_rounds(checkpoint_dir).items()):
    if is_complete_checkpoint(path):
      continue
    target = os.path.join(checkpoint_dir, 'incomplete',
                          f'{os.path.basename(path)}-{time.strftime("%Y%m%dT%H%M%S")}')
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(path, target)
    logging.warning('Checkpoint of round %d at %s is incomplete (no saved_model.pb or variables); '
                    'moved it to %s', round_num, path, target)
    moved.append(target)
  return moved


def latest_checkpoint_round(run_dir: str) -> Optional[int]:
  """The round of the newest complete checkpoint in `run_dir`, if any."""
  rounds = [r for r, path in _checkpoint_rounds(os.path.join(run_dir, 'checkpoints')).items()
            if is_complete_checkpoint(path)]
  return max(rounds) if rounds else None


class _MetricsAugmentedProcess:
  """Wraps `process.next` to add per-round metrics (e.g. running epsilon)."""

  def __init__(self, process, extra_metrics_fn: Callable[[int], Mapping[str, Any]]):
    self._process = process
    self._extra = extra_metrics_fn
    self._round = 0
    self.initialize = process.initialize

  def set_round(self, round_num: int) -> None:
    self._round = round_num

  def next(self, state, data):
    output = self._process.next(state, data)
    metrics = collections.OrderedDict(output.metrics)
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
  set_aside_incomplete_checkpoints(checkpoint_dir)
  start = latest_checkpoint_round(run_dir) or 0
  if start:
    logging.warning('Resuming %s from the checkpoint of round %d', run_dir, start)
  state_manager = tff.program.FileProgramStateManager(
      root_dir=checkpoint_dir, prefix='program_state_', keep_total=config.keep_checkpoints
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

  training_process = process
  selection_fn = training_selection_fn
  if extra_metrics_fn is not None:
    training_process = _MetricsAugmentedProcess(process, extra_metrics_fn)

    def selection_fn(round_num):  # pylint: disable=function-redefined
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
