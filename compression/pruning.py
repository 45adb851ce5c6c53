"""Magnitude pruning of a trained recommender with TF-MOT, embedding tables included.

`prune(model, task, train, PruningConfig(...))` wraps the prunable layers in
`tfmot.sparsity.keras.prune_low_magnitude` (the `EmbeddingLookup` tables
through their `get_prunable_weights`, Dense kernels through TF-MOT's
registry), fine-tunes centrally with Keras `fit` and the `UpdatePruningStep`
callback, and returns the `strip_pruning`-ed float model (zeros in place of
pruned weights) with the sparsity achieved per weight.

Schedules: 'constant' prunes to the target at the first step and keeps the mask
fresh every `frequency` steps (with `finetune_epochs=0` it is one-shot
magnitude pruning without training); 'polynomial' ramps sparsity from 0 to
the target over the first 70% of the fine-tuning steps (TF-MOT's
`PolynomialDecay`, power 3), so the last 30% train at the final mask.

Basis: for a dot-product MF, `basis='svd'` (or 'auto', the default) first
moves both tables to the balanced SVD basis (`compression.rotation`), which
leaves every score unchanged and lets magnitude pruning drop weak
directions instead of small entries; 'none' prunes the trained basis.

1-wide tables (user/item biases) are kept dense unless `prune_biases`: they
are a small share of the parameters and carry the popularity signal. Dense
kernels (NeuMF, two-tower) are pruned unless `prune_dense=False`. Layers
named in `exclude` (FedRecon's on-device user rows) are not pruned.

Federated fine-tuning is `compression.federated_finetune`: prune here
(e.g. one-shot, `finetune_epochs=0`), then FedAvg / FedRecon rounds with the
zero pattern fixed as a mask (TF-MOT's wrapper itself does not fit a TFF
client update: its mask and step variables would be broadcast and averaged,
and its `UpdatePruningStep` callback has no place there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from compression import rotation
from tff_rec.data import centralized
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base

SCHEDULES = ('constant', 'polynomial')
_RAMP_FRACTION = 0.7


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """How to prune and fine-tune."""

  target_sparsity: float
  schedule: str = 'polynomial'
  finetune_epochs: int = 1
  batch_size: int = 256
  learning_rate: float = 1e-3
  frequency: int = 100
  prune_biases: bool = False
  prune_dense: bool = True  # False: embedding tables only (e.g. before federated fine-tuning)
  negatives_per_positive: int = 4  # implicit models
  seed: int = 0
  # Row L2 of the embedding tables while fine-tuning (None: the model's own).
  finetune_l2: Optional[float] = None
  # 'auto': the SVD basis for dot-product MF, the trained basis otherwise.
  basis: str = 'auto'

  def __post_init__(self):
    if self.basis not in rotation.BASES:
      raise ValueError(f'basis must be one of {list(rotation.BASES)}, got {self.basis!r}')
    if self.finetune_l2 is not None and self.finetune_l2 < 0:
      raise ValueError(f'finetune_l2 must be >= 0, got {self.finetune_l2}')
    if not 0.0 < self.target_sparsity < 1.0:
      raise ValueError(f'target_sparsity must be in (0, 1), got {self.target_sparsity}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}')
    if self.finetune_epochs < 0:
      raise ValueError(f'finetune_epochs must be >= 0, got {self.finetune_epochs}')
    if self.schedule == 'polynomial' and self.finetune_epochs == 0:
      raise ValueError('the polynomial schedule ramps sparsity during fine-tuning; '
                       'use finetune_epochs > 0 or the constant schedule')
    if self.batch_size <= 0 or self.frequency <= 0 or not self.learning_rate > 0:
      raise ValueError('batch_size, frequency and learning_rate must be positive')


@dataclasses.dataclass
class PruneResult:
  model: tf.keras.Model  # stripped float model, same layers as the input
  sparsity: dict  # weight name -> fraction of zeros (every weight)
  pruned_layers: tuple
  losses: list
  basis: str = 'none'  # the basis pruned in: 'svd' or 'none'


def weight_sparsity(model: tf.keras.Model) -> dict:
  """Fraction of exact zeros in each weight, by variable name."""
  out = {}
  for w in model.weights:
    a = w.numpy()
    out[w.name] = float(1.0 - np.count_nonzero(a) / a.size) if a.size else 0.0
  return out


def prunable_layers(model: tf.keras.Model, prune_biases: bool = False,
                    exclude: Sequence[str] = (), prune_dense: bool = True) -> list[str]:
  """Names of the layers `prune` wraps."""
  names = []
  for layer in model.layers:
    if layer.name in exclude:
      continue
    if isinstance(layer, base.EmbeddingLookup) and (layer.output_dim > 1 or prune_biases):
      names.append(layer.name)
    elif isinstance(layer, tf.keras.layers.Dense) and prune_dense:
      names.append(layer.name)
  return names


def _schedule(config: PruningConfig, total_steps: int):
  # TF-MOT increments the step before updating masks: the first step is 1.
  if config.schedule == 'constant':
    return tfmot.sparsity.keras.ConstantSparsity(
        config.target_sparsity, begin_step=1, frequency=config.frequency)
  end = max(2, int(_RAMP_FRACTION * total_steps))
  return tfmot.sparsity.keras.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=config.target_sparsity, begin_step=1, end_step=end,
      frequency=max(1, min(config.frequency, end // 10)))


def _copy(model: tf.keras.Model) -> tf.keras.Model:
  out = tf.keras.models.clone_model(model)
  out.set_weights(model.get_weights())
  return out


def prune(
    model: tf.keras.Model,
    task: str,
    train: Optional[ratings_lib.Ratings],
    config: PruningConfig,
    exclude: Sequence[str] = (),
) -> PruneResult:
  """Prunes a copy of `model` (which is left unchanged); see the module docstring."""
  from tff_rec.training import model_fns  # pylint: disable=g-import-not-at-top

  if config.finetune_epochs and train is None:
    raise ValueError('fine-tuning needs the training ratings')
  names = prunable_layers(model, config.prune_biases, exclude, config.prune_dense)
  if not names:
    raise ValueError(f'model {model.name!r} has no prunable layers')
  negatives = config.negatives_per_positive if task == base.TASK_IMPLICIT else 0
  examples = train.num_ratings * (1 + negatives) if train is not None else 1
  steps_per_epoch = max(1, math.ceil(examples / config.batch_size))
  schedule = _schedule(config, steps_per_epoch * max(config.finetune_epochs, 1))

  basis = rotation.resolve(config.basis, model, exclude)
  work = _copy(model)
  if basis == 'svd':
    rotation.rotate_mf(work)
  if config.finetune_l2 is not None:
    for layer in work.layers:
      if isinstance(layer, base.EmbeddingLookup):
        layer.l2 = float(config.finetune_l2)
  wrapped = tf.keras.models.clone_model(
      work, clone_function=lambda layer: (
          tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
          if layer.name in names else layer))
  callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
  losses = []
  if config.finetune_epochs:
    wrapped.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                    loss=model_fns.loss_fn(task)())
    for epoch in range(config.finetune_epochs):
      ds = centralized.keras_dataset(train, config.batch_size, seed=config.seed + epoch,
                                     negatives_per_positive=negatives)
      fit = wrapped.fit(ds, epochs=1, verbose=0, callbacks=callbacks)
      losses.append(float(fit.history['loss'][-1]))
  else:
    # One-shot: a single step at learning rate 0 computes and applies the masks.
    wrapped.compile(optimizer=tf.keras.optimizers.SGD(0.0), loss=model_fns.loss_fn(task)())
    x = {'user': np.zeros([1], np.int32), 'item': np.zeros([1], np.int32)}
    wrapped.fit(x, np.zeros([1], np.float32), epochs=1, verbose=0, callbacks=callbacks)
  stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
  return PruneResult(stripped, weight_sparsity(stripped), tuple(names), losses, basis)
