"""A run directory's guards: one process at a time, and no silent change of configuration.

* `lock(run_dir)`: an exclusive `fcntl` lock on `run_dir/.lock` for the
  life of the run; a second run into the same directory is refused while the
  first is alive (the kernel drops the lock when a process dies, even by
  SIGKILL, so a crashed run never blocks its resumption).
* `check_resume(run_dir, hparams)`: before anything is written, the
  result-defining configuration of a run being resumed is compared with the
  one stored in its `hparams.json`. A difference is refused with every
  differing flag and both values (execution-only settings, and the round
  count, may change).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Any, Iterator, Mapping

from tff_rec.training import artifacts

LOCK_FILE = '.lock'
HPARAMS = 'hparams.json'
# Entries of hparams.json that define a run's result (besides `config`):
# which DP mechanism and which update compression.
_DP_RESULT_KEYS = ('mode', 'noise_multiplier', 'clip', 'clip_is_adaptive', 'zeroing',
                   'clients_per_round', 'sampling')


class RunLockedError(RuntimeError):
  """Another process is running in the same run directory."""


class ConfigChangedError(ValueError):
  """A run directory was trained with a different result-defining configuration."""


@contextlib.contextmanager
def lock(run_dir: str) -> Iterator[None]:
  """Holds the run directory's lock; RunLockedError if another process holds it."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
      raise RunLockedError(
          f'{run_dir} is in use by another run (pid {holder}); wait for it to finish, or use '
          'another --experiment_name') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _flatten(value: Any, prefix: str = '') -> dict:
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: value}


def result_signature(hparams: Mapping[str, Any]) -> dict:
  """The result-defining entries of an `hparams.json` record, flattened to dotted paths."""
  config = dict(hparams.get('config', {}))
  config.pop('total_rounds', None)  # A run may be extended.
  out = _flatten(config, 'config.')
  dp = hparams.get('dp') or {}
  out.update(_flatten({k: dp.get(k) for k in _DP_RESULT_KEYS if k in dp}, 'dp.'))
  compression = hparams.get('compression')
  if compression:
    out.update(_flatten(compression, 'compression.'))
  return out


_OPTIMIZER_FLAGS = {'name': '{p}_optimizer', 'learning_rate': '{p}_learning_rate',
                    'schedule': '{p}_lr_schedule', 'decay_steps': '{p}_lr_decay_steps',
                    'decay_rate': '{p}_lr_decay_rate'}
_NAMES = {'config.model.name': 'model', 'config.algorithm.name': 'algorithm',
          'config.model.hparams.factors': 'embedding_dim',
          'config.model.hparams.layers': 'mlp_layers', 'dp.mode': 'dp', 'dp.clip': 'dp_clip',
          'dp.noise_multiplier': 'dp_noise_multiplier', 'dp.zeroing': 'dp_zeroing',
          'compression.mode': 'compression', 'config.recon_eval.reconstruction': 'reconstruction'}


def flag_name(path: str) -> str:
  """The command-line flag of a dotted config path (best effort), e.g. `--embedding_dim`."""
  if path in _NAMES:
    return '--' + _NAMES[path]
  parts = path.split('.')
  for prefix in ('client', 'server', 'reconstruction'):
    if f'{prefix}_optimizer' in parts[:-1] and parts[-1] in _OPTIMIZER_FLAGS:
      return '--' + _OPTIMIZER_FLAGS[parts[-1]].format(p=prefix)
  if parts[1:2] == ['recon_eval'] and parts[-1] in ('recon_epochs', 'recon_steps_max',
                                                   'post_recon_steps_max'):
    return '--' + parts[-1]
  return '--' + parts[-1]


def check_resume(run_dir: str, hparams: Mapping[str, Any], *, default_config: Mapping[str, Any],
                 allow_change: bool = False) -> None:
  """ConfigChangedError if `run_dir` was trained with a different result-defining configuration.

  Args:
    run_dir: The run directory (nothing to check if it has no `hparams.json`).
    hparams: The new run's `hparams.json` record (before it is written).
    default_config: The config's defaults (`dataclasses.asdict(FederatedConfig())`):
      a setting the stored record predates counts as its default.
    allow_change: Continue anyway (the results then mix configurations).
  """
  path = os.path.join(run_dir, HPARAMS)
  if not os.path.isfile(path):
    return
  try:
    stored = artifacts.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigChangedError(f'{path} is unreadable ({e}); cannot tell what {run_dir} was '
                             'trained with: delete it or use another --experiment_name') from e
  old, new = result_signature(stored), result_signature(hparams)
  defaults = result_signature({'config': default_config})
  changed = [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]
  # A config setting the stored record predates had its default value then;
  # one only the stored record has is execution-only now (moved out of the
  # config). DP and compression entries count on either side.
  changed += [(k, old[k], '(not set)') for k in sorted(set(old) - set(new))
              if not k.startswith('config.')]
  changed += [(k, defaults.get(k, '(not set)'), new[k]) for k in sorted(set(new) - set(old))
              if not k.startswith('config.') or new[k] != defaults.get(k, new[k])]
  if not changed or allow_change:
    return
  lines = '\n'.join(f'  {flag_name(k)} ({k}): was {a!r}, now {b!r}' for k, a, b in changed)
  raise ConfigChangedError(
      f'{run_dir} holds a run trained with a different configuration; resuming it would mix '
      f'the two:\n{lines}\nTo start fresh, use another --experiment_name (or delete {run_dir}); '
      'to continue with the new settings anyway, pass --allow_config_change.')
