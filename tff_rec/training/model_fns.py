"""No-arg model constructors for TFF: plain `tff.learning` and FedRecon models.

User-side parameters come in three variants (`UserEmbedding`):
- `table`: a user table shared in the global model; each client updates its
  own row (FedAvg/FedProx when test users were seen in training);
- `shared`: one user row shared by all clients and aggregated (the FedAvg
  baseline of Singhal et al. 2021 for held-out users, personalized by
  fine-tuning at evaluation);
- `local`: one on-device row, never aggregated, rebuilt every round
  (Federated Reconstruction).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.data import federated
from tff_rec.models import base
from tff_rec.models import metrics as metrics_lib


class UserEmbedding(str, enum.Enum):
  TABLE = 'table'
  SHARED = 'shared'
  LOCAL = 'local'


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build the Keras recommender for one variant of user parameters."""

  builder: Callable[..., base.RecModel]  # (num_users, num_items, personal=, seed=)
  num_users: int
  num_items: int
  task: str
  seed: int = 0
  # Fixed 0/1 sparsity patterns of embedding tables, by layer name
  # (`EmbeddingLookup.set_mask`): fine-tuning a pruned model keeps them.
  masks: Optional[Mapping[str, np.ndarray]] = None
  # The registry name (`--model`), for messages.
  name: str = ''

  def build(self, user_embedding: UserEmbedding) -> base.RecModel:
    personal = user_embedding != UserEmbedding.TABLE
    rec = self.builder(self.num_users, self.num_items, personal=personal, seed=self.seed)
    for name, mask in (self.masks or {}).items():
      layer = rec.keras_model.get_layer(name)
      if not isinstance(layer, base.EmbeddingLookup):
        raise ValueError(f'mask for {name!r}: only EmbeddingLookup tables take a fixed mask, '
                         f'not {type(layer).__name__}')
      layer.set_mask(mask)
    return rec


def loss_fn(task: str) -> Callable[[], tf.keras.losses.Loss]:
  """The training loss factory for a task."""
  if task == base.TASK_RATING:
    return tf.keras.losses.MeanSquaredError
  if task == base.TASK_IMPLICIT:
    return lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True)
  raise ValueError(f'unknown task {task!r}')


def metrics_fn(task: str) -> Callable[[], list[tf.keras.metrics.Metric]]:
  """The metrics factory for a task."""
  if task == base.TASK_RATING:
    return metrics_lib.rating_metrics_fn
  if task == base.TASK_IMPLICIT:
    return metrics_lib.implicit_metrics_fn
  raise ValueError(f'unknown task {task!r}')


def tff_model_fn(
    spec: ModelSpec,
    user_embedding: UserEmbedding,
    input_spec=None,
) -> Callable[[], tff.learning.models.VariableModel]:
  """A no-arg constructor of the plain `tff.learning` model."""
  if user_embedding == UserEmbedding.LOCAL:
    raise ValueError('local user embeddings need a ReconstructionModel')
  input_spec = input_spec or federated.element_spec()

  def model_fn():
    rec = spec.build(user_embedding)
    return tff.learning.models.from_keras_model(
        rec.keras_model,
        loss=loss_fn(spec.task)(),
        input_spec=input_spec,
        metrics=metrics_fn(spec.task)(),
    )

  return model_fn


def recon_model_fn(
    spec: ModelSpec, input_spec=None
) -> Callable[[], tff.learning.models.ReconstructionModel]:
  """A no-arg constructor of the FedRecon model (user rows local)."""
  input_spec = input_spec or federated.element_spec()

  def model_fn():
    rec = spec.build(UserEmbedding.LOCAL)
    return tff.learning.models.ReconstructionModel.from_keras_model_and_layers(
        rec.keras_model,
        global_layers=list(rec.global_layers),
        local_layers=list(rec.local_layers),
        input_spec=input_spec,
    )

  return model_fn


def closed_form_ridge(spec: ModelSpec) -> tuple[float, ...]:
  """The L2 coefficient of each local trainable variable, for closed-form reconstruction.

  Args:
    spec: The model spec.

  Returns:
    One coefficient per local trainable variable, in TFF's order.

  Raises:
    ValueError: naming the model, if its reconstruction is not a ridge
      regression: the prediction must be affine in the user-side variables
      (`RecModel.affine_in_local`: biased MF, GMF), the loss squared (a
      rating task), and every user-side layer an `EmbeddingLookup` (whose
      row L2 is the ridge term).
  """
  rec = spec.build(UserEmbedding.LOCAL)
  name = spec.name or rec.keras_model.name
  why = None
  if not rec.affine_in_local:
    why = 'its prediction is not affine in the user-side variables'
  elif spec.task != base.TASK_RATING:
    why = f'its task is {spec.task!r} (a logistic loss), not a rating regression (squared loss)'
  elif not all(isinstance(layer, base.EmbeddingLookup) for layer in rec.local_layers):
    why = 'a user-side layer is not an EmbeddingLookup'
  if why:
    raise ValueError(
        f'closed-form reconstruction does not apply to model {name!r}: {why}. It solves a ridge '
        "regression, which needs biased MF ('mf') or GMF with task='rating'; use "
        'reconstruction=gradient for this model')
  return tuple(float(layer.l2) for layer in rec.local_layers for _ in layer.trainable_variables)


def trainable_variable_names(spec: ModelSpec, user_embedding: UserEmbedding) -> list[str]:
  """Names of the model's trainable variables, in TFF's ModelWeights order."""
  rec = spec.build(user_embedding)
  if user_embedding == UserEmbedding.LOCAL:
    return [v.name for v in rec.global_variables if v.trainable]
  return [v.name for v in rec.keras_model.trainable_variables]


def embedding_table_mask(spec: ModelSpec, user_embedding: UserEmbedding) -> list[bool]:
  """For each trainable variable, whether it is a row-sparse embedding table."""
  rec = spec.build(user_embedding)
  tables = set(rec.embedding_variable_names)
  if user_embedding != UserEmbedding.TABLE:
    # One-row user tables are dense: every client updates that row.
    tables -= {layer.name for layer in rec.local_layers}
  variables = (
      [v for v in rec.global_variables if v.trainable]
      if user_embedding == UserEmbedding.LOCAL
      else rec.keras_model.trainable_variables
  )
  return [v.name.split('/')[0] in tables for v in variables]


def keras_model(spec: ModelSpec, user_embedding: UserEmbedding) -> tf.keras.Model:
  """A fresh Keras model of the variant (for loading weights and export)."""
  return spec.build(user_embedding).keras_model
