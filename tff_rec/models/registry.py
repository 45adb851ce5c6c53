"""Recommender builders by name."""

from __future__ import annotations

import inspect
from typing import Any

from tff_rec.models import base
from tff_rec.models import mf
from tff_rec.models import neumf
from tff_rec.models import sasrec
from tff_rec.models import two_tower

MODEL_NAMES = ('mf', 'gmf', 'mlp', 'neumf', 'ncf_softmax', 'two_tower')

_BUILDERS: dict[str, base.ModelBuilder] = {
    'mf': mf.build_mf,
    'gmf': neumf.build_gmf,
    'mlp': neumf.build_mlp,
    'neumf': neumf.build_neumf,
    'ncf_softmax': neumf.build_ncf_softmax_rating,
    'two_tower': two_tower.build_two_tower,
}

_TASKS = {
    'mf': base.TASK_RATING,
    'gmf': base.TASK_IMPLICIT,
    'mlp': base.TASK_IMPLICIT,
    'neumf': base.TASK_IMPLICIT,
    'ncf_softmax': base.TASK_RATING,
    'two_tower': base.TASK_IMPLICIT,
}


def _check_name(name: str) -> None:
  if name not in _BUILDERS:
    raise ValueError(f'unknown model {name!r}; valid: {", ".join(MODEL_NAMES)}')


def hparam_names(name: str) -> tuple[str, ...]:
  """The hyperparameters `build_model(name, ...)` accepts as keywords."""
  _check_name(name)
  params = inspect.signature(_BUILDERS[name]).parameters
  return tuple(p for p, v in params.items()
               if v.kind == inspect.Parameter.KEYWORD_ONLY and p not in ('personal', 'seed'))


def build_model(name: str, num_users: int, num_items: int, *, personal: bool = False,
                seed: int = 0, **hparams: Any) -> base.RecModel:
  """Builds the registry model `name`.

  Args:
    name: One of `MODEL_NAMES`.
    num_users: Users (rows of a user table).
    num_items: Items (rows of the item table).
    personal: One local user row instead of a user table (FedRecon).
    seed: Initializer seed.
    **hparams: The builder's hyperparameters (`hparam_names(name)`).

  Returns:
    The model's `base.RecModel`.

  Raises:
    ValueError: An unknown name, or a hyperparameter the model does not have
      (the message lists the valid ones).
  """
  _check_name(name)
  valid = hparam_names(name)
  unknown = sorted(set(hparams) - set(valid))
  if unknown:
    raise ValueError(
        f'model {name!r} has no hyperparameter(s) {", ".join(unknown)}; valid: {", ".join(valid)}')
  return _BUILDERS[name](num_users, num_items, personal=personal, seed=seed, **hparams)


def default_task(name: str, **hparams: Any) -> str:
  """The task (`base.TASK_RATING` / `TASK_IMPLICIT`) of model `name`.

  Models with a `task` hyperparameter (gmf, mlp, neumf) report it when given.
  """
  _check_name(name)
  task = hparams.get('task')
  if task is None or 'task' not in hparam_names(name):
    return _TASKS[name]
  if task not in (base.TASK_RATING, base.TASK_IMPLICIT):
    raise ValueError(f'unknown task {task!r} for model {name!r}')
  return task


# Sequential models: the input is a user's recent items, not a user id.
SEQUENTIAL_MODEL_NAMES = ('sasrec',)
_SEQUENTIAL_BUILDERS = {'sasrec': sasrec.build_sasrec}


def sequential_hparam_names(name: str) -> tuple[str, ...]:
  """The hyperparameters `build_sequential_model(name, ...)` accepts as keywords."""
  if name not in _SEQUENTIAL_BUILDERS:
    raise ValueError(f'unknown sequential model {name!r}; valid: {", ".join(SEQUENTIAL_MODEL_NAMES)}')
  params = inspect.signature(_SEQUENTIAL_BUILDERS[name]).parameters
  return tuple(p for p, v in params.items()
               if v.kind == inspect.Parameter.KEYWORD_ONLY
               and p not in ('seed', 'item_init', 'item_features'))


def build_sequential_model(name: str, num_items: int, *, seed: int = 0, item_init: Any = None,
                           item_features: Any = None, **hparams: Any) -> Any:
  """Builds the sequential model `name` (e.g. `sasrec.SASRec`) with its variables.

  Args:
    name: One of `SEQUENTIAL_MODEL_NAMES`.
    num_items: Items (ids 1..num_items; 0 pads).
    seed: Initializer seed.
    item_init: Optional initial item table `[num_items + 1, d]`.
    item_features: Optional fixed item features `[num_items + 1, F]`.
    **hparams: The builder's hyperparameters (`sequential_hparam_names(name)`).

  Returns:
    The built Keras model.

  Raises:
    ValueError: An unknown name or hyperparameter (the message lists the valid ones).
  """
  valid = sequential_hparam_names(name)
  unknown = sorted(set(hparams) - set(valid))
  if unknown:
    raise ValueError(f'model {name!r} has no hyperparameter(s) {", ".join(unknown)}; '
                     f'valid: {", ".join(valid)}')
  return _SEQUENTIAL_BUILDERS[name](num_items, seed=seed, item_init=item_init,
                                    item_features=item_features, **hparams)
