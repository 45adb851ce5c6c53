"""Federated fine-tuning of a pruned recommender, with its sparsity pattern fixed.

`finetune(pruned_model, model_config, train, FederatedFinetuneConfig(...))`
reads the zero pattern of each pruned embedding table (`masks_of`), builds
the run's model with those patterns as fixed masks
(`EmbeddingLookup.set_mask`: a masked entry neither affects the output nor
gets a gradient), starts TFF's FedAvg (shared user table) or FedRecon
(on-device user rows) from the pruned weights, trains over one client per
user with `tff.simulation.run_training_process` (checkpointed in `run_dir`,
so an interrupted fine-tuning resumes; a `run_dir` holding a fine-tuning of
other inputs is refused), and returns the plain model with the
masks applied to the final weights: exactly as sparse as its input.

Only embedding tables take a fixed mask here (they hold nearly all of a
recommender's weights): prune with `PruningConfig(prune_dense=False)`, as
`experiments.compress_and_export --finetune=federated` does, and the Dense
layers of NeuMF / two-tower models are fine-tuned dense. A pruned Dense
kernel raises `ValueError`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from compression import pruning
from tff_rec.data import federated
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import artifacts
from tff_rec.training import experiment
from tff_rec.training import loop
from tff_rec.training import model_fns
from tff_rec.training import optimizers
from tff_rec.training import sampling


@dataclasses.dataclass(frozen=True)
class FederatedFinetuneConfig:
  """FedAvg / FedRecon fine-tuning of a pruned model."""

  rounds: int = 10
  clients_per_round: int = 50
  client_learning_rate: float = 0.1  # client SGD
  server_learning_rate: float = 1.0  # server SGD
  reconstruction_learning_rate: float = 0.1  # FedRecon only
  batch_size: int = 16
  client_epochs: int = 1
  max_examples_per_user: Optional[int] = 300
  negatives_per_positive: int = 4  # implicit models
  seed: int = 0
  progress_bar: bool = False

  def __post_init__(self):
    if self.rounds <= 0 or self.clients_per_round <= 0:
      raise ValueError('rounds and clients_per_round must be positive')
    if not (self.client_learning_rate > 0 and self.server_learning_rate > 0
            and self.reconstruction_learning_rate > 0):
      raise ValueError('learning rates must be positive')


@dataclasses.dataclass
class FederatedFinetuneResult:
  model: tf.keras.Model  # plain (unmasked layers), pruned entries exactly 0
  masks: dict  # layer name -> uint8 0/1 pattern that was kept
  sparsity: dict  # weight name -> fraction of zeros
  metrics: dict  # the last round's training metrics, flattened


def masks_of(model: tf.keras.Model, exclude=()) -> dict[str, np.ndarray]:
  """The 0/1 nonzero patterns of the model's embedding tables that hold exact zeros.

  Raises ValueError when a Dense kernel holds zeros (a pruned Dense layer).
  """
  masks = {}
  for layer in model.layers:
    if layer.name in exclude or not layer.weights:
      continue
    table = layer.get_weights()[0]
    if isinstance(layer, base.EmbeddingLookup):
      if np.any(table == 0):
        masks[layer.name] = (table != 0).astype(np.uint8)
    elif isinstance(layer, tf.keras.layers.Dense) and np.any(table == 0):
      raise ValueError(
          f'layer {layer.name!r} (Dense) is pruned, but federated fine-tuning keeps fixed masks '
          'on embedding tables only; prune with prune_dense=False, or fine-tune this model '
          'centrally (compression.pruning)')
  return masks


def _spec(model_config: Mapping, masks: Mapping[str, np.ndarray]) -> model_fns.ModelSpec:
  builder = functools.partial(registry.build_model, model_config['model'], **model_config['hparams'])
  return model_fns.ModelSpec(builder=builder, num_users=model_config['num_users'],
                             num_items=model_config['num_items'], task=model_config['task'],
                             seed=model_config.get('seed', 0), masks=dict(masks))


def _matching(rec: base.RecModel, model: tf.keras.Model) -> dict:
  """`rec`'s variables -> the same variable of `model` (same builder, same order)."""
  pairs = list(zip(rec.keras_model.variables, model.variables))
  if len(rec.keras_model.variables) != len(model.variables) or any(
      a.shape != b.shape for a, b in pairs):
    raise ValueError('the model does not match its model_config (different variables)')
  return {a.ref(): b for a, b in pairs}


def _initial_weights(rec: base.RecModel, model: tf.keras.Model,
                     user_embedding: model_fns.UserEmbedding) -> tff.learning.models.ModelWeights:
  """The pruned model's values in the process's `ModelWeights` layout."""
  source = _matching(rec, model)
  if user_embedding == model_fns.UserEmbedding.LOCAL:
    variables = rec.global_variables
  else:
    variables = rec.keras_model.variables
  trainable = [source[v.ref()].numpy() for v in variables if v.trainable]
  non_trainable = [source[v.ref()].numpy() for v in variables if not v.trainable]
  return tff.learning.models.ModelWeights(trainable, non_trainable)


class _WarmStart:
  """A learning process whose `initialize` starts from given model weights."""

  def __init__(self, process, weights):
    self._process = process
    self._weights = weights
    self.next = process.next
    self.get_model_weights = process.get_model_weights

  def initialize(self):
    return self._process.set_model_weights(self._process.initialize(), self._weights)


def finetune(
    model: tf.keras.Model,
    model_config: Mapping,
    train: ratings_lib.Ratings,
    config: FederatedFinetuneConfig,
    run_dir: str,
    masks: Optional[Mapping[str, np.ndarray]] = None,
) -> FederatedFinetuneResult:
  """Fine-tunes the pruned `model` federatedly, keeping its zeros; see the module docstring.

  `masks` defaults to the zero patterns of the model's pruned tables. Needs
  a TFF execution context (e.g. `tff_rec.runtime.set_local_context()`).
  """
  user_embedding = model_fns.UserEmbedding(model_config['user_embedding'])
  # The unmasked model: the layout of the start weights, and at the end the trained ones.
  rec = _spec(model_config, {}).build(user_embedding)
  # Local (on-device) user rows are not the server's; FedAvg trains the user table too.
  local = ([layer.name for layer in rec.local_layers]
           if user_embedding == model_fns.UserEmbedding.LOCAL else [])
  if masks is None:
    masks = masks_of(model, exclude=local)
  if not masks:
    raise ValueError('the model has no pruned embedding table (no exact zeros) to fine-tune')
  implicit = model_config['task'] == base.TASK_IMPLICIT
  users = train.present_users()
  if config.clients_per_round > len(users):
    raise ValueError(f'clients_per_round={config.clients_per_round} exceeds the {len(users)} '
                     'training users')
  _claim(run_dir, config, model_config, masks)
  spec = _spec(model_config, masks)
  sgd = lambda lr: optimizers.OptimizerConfig('sgd', lr)
  name = 'fedrecon' if user_embedding == model_fns.UserEmbedding.LOCAL else 'fedavg'
  process = algorithms.build_process(
      algorithms.AlgorithmConfig(
          name=name, client_optimizer=sgd(config.client_learning_rate),
          server_optimizer=sgd(config.server_learning_rate),
          reconstruction_optimizer=sgd(config.reconstruction_learning_rate)),
      spec, user_embedding)
  start = _initial_weights(rec, model, user_embedding)
  data = federated.client_data(train, federated.ClientDatasetConfig(
      batch_size=config.batch_size, num_epochs=config.client_epochs,
      max_examples_per_user=config.max_examples_per_user, seed=config.seed,
      negatives_per_positive=config.negatives_per_positive if implicit else 0))
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)
  sampler = sampling.ClientSampler(users, config.clients_per_round, config.seed, 'fixed_size')
  state = loop.run(_WarmStart(composed, start), sampler, run_dir, loop.LoopConfig(
      total_rounds=config.rounds, checkpoint_every=max(1, math.ceil(config.rounds / 4)),
      progress_bar=config.progress_bar))

  # The final weights in a copy of the input model, masks applied (local rows kept).
  experiment.assign_global_weights(rec, user_embedding, composed.get_model_weights(state))
  out = tf.keras.models.clone_model(model)
  out.set_weights(model.get_weights())
  target = _matching(rec, out)
  for layer in rec.keras_model.layers:
    if layer.name in local:
      continue
    for v in layer.variables:
      target[v.ref()].assign(v)
  for layer_name, mask in masks.items():
    layer = out.get_layer(layer_name)
    layer.embeddings.assign(layer.embeddings.numpy() * mask)
  return FederatedFinetuneResult(out, dict(masks), pruning.weight_sparsity(out), _last_metrics(run_dir))


def _claim(run_dir: str, config: FederatedFinetuneConfig, model_config: Mapping,
           masks: Mapping[str, np.ndarray]) -> None:
  """Records what `run_dir` fine-tunes; refuses to resume a different fine-tuning there."""
  digest = hashlib.sha256()
  for name in sorted(masks):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(masks[name], np.uint8).tobytes())
  inputs = {'config': dataclasses.asdict(config), 'model': model_config['model'],
            'hparams': model_config['hparams'], 'masks_sha256': digest.hexdigest()}
  path = os.path.join(run_dir, 'finetune_inputs.json')
  if os.path.exists(path):
    previous = artifacts.read_json(path)
    if previous != json.loads(json.dumps(inputs)):
      raise ValueError(f'{run_dir} holds a federated fine-tuning of other inputs '
                       f'({path}); remove it or choose another directory')
    return
  os.makedirs(run_dir, exist_ok=True)
  artifacts.write_json(path, inputs)


def _last_metrics(run_dir: str) -> dict:
  path = os.path.join(run_dir, 'metrics.csv')
  if not os.path.exists(path):
    return {}
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  return dict(rows[-1]) if rows else {}
