"""Every registered model inside TFF: Keras wrappers and one FedRecon round."""

import sys
import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec import runtime
from tff_rec.data import federated
from tff_rec.models import base
from tff_rec.models import metrics
from tff_rec.models import registry

NUM_USERS, NUM_ITEMS = 5, 12


@pytest.fixture(scope='module', autouse=True)
def local_tff_context():
  """TFF on our own local worker (never TFF's default, which leaks workers).

  The worker is left running for later tests in this process; the runtime
  stops it at exit.
  """
  return runtime.set_local_context()


def _loss_fn(task: str):
  if task == base.TASK_IMPLICIT:
    return lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True)
  return tf.keras.losses.MeanSquaredError


def _metrics_fn(task: str):
  return metrics.implicit_metrics_fn if task == base.TASK_IMPLICIT else metrics.rating_metrics_fn


def _client_dataset(user: int, task: str) -> tf.data.Dataset:
  items = (np.arange(6) * 2 + user) % NUM_ITEMS
  if task == base.TASK_IMPLICIT:
    y = (np.arange(6) % 2).astype(np.float32)
  else:
    y = (1.0 + (items + user) % 5).astype(np.float32)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
      x=collections.OrderedDict(user=np.full(6, user, np.int32), item=items.astype(np.int32)),
      y=y,
  )).batch(3)


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_from_keras_model_forward_pass(name):
  task = registry.default_task(name)
  rec = registry.build_model(name, NUM_USERS, NUM_ITEMS)
  model = tff.learning.models.from_keras_model(
      rec.keras_model, loss=_loss_fn(task)(), input_spec=federated.element_spec(),
      metrics=_metrics_fn(task)())
  batch = next(iter(_client_dataset(2, task)))
  out = model.forward_pass(batch, training=False)
  assert out.predictions.shape == (3,)
  assert out.num_examples == 3
  assert np.isfinite(float(out.loss))
  assert len(model.trainable_variables) == len(rec.keras_model.trainable_variables)


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_fed_recon_round(name):
  task = registry.default_task(name)

  def model_fn():
    rec = registry.build_model(name, NUM_USERS, NUM_ITEMS, personal=True)
    return tff.learning.models.ReconstructionModel.from_keras_model_and_layers(
        rec.keras_model,
        global_layers=list(rec.global_layers),
        local_layers=list(rec.local_layers),
        input_spec=federated.element_spec(),
    )

  recon = model_fn()
  rec = registry.build_model(name, NUM_USERS, NUM_ITEMS, personal=True)
  assert len(recon.global_trainable_variables) == len(rec.global_variables)
  assert len(recon.local_trainable_variables) == len(rec.local_variables) > 0

  process = tff.learning.algorithms.build_fed_recon(
      model_fn,
      loss_fn=_loss_fn(task),
      metrics_fn=_metrics_fn(task),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
      reconstruction_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
  )
  state = process.initialize()
  before = process.get_model_weights(state).trainable
  output = process.next(state, [_client_dataset(u, task) for u in range(3)])
  after = process.get_model_weights(output.state).trainable
  train_metrics = output.metrics['client_work']['train']
  expected = {'bce', 'accuracy', 'auc'} if task == base.TASK_IMPLICIT else {
      'mse', 'rmse', 'mae', 'rating_accuracy'}
  assert expected <= set(train_metrics)
  assert all(np.isfinite(float(v)) for v in train_metrics.values())
  # Only global variables travel, and the round moved them.
  assert len(after) == len(rec.global_variables)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
