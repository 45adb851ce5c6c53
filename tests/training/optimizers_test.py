"""Optimizers by name and learning-rate schedules."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from tff_rec.training import optimizers


@pytest.mark.parametrize('name', optimizers.OPTIMIZERS)
def test_every_optimizer_takes_a_step(name):
  opt = optimizers.build_optimizer(optimizers.OptimizerConfig(name, 0.1))
  weights = (tf.constant([1.0, -1.0]),)
  state = opt.initialize((tf.TensorSpec([2], tf.float32),))
  state, new = opt.next(state, weights, (tf.constant([1.0, -1.0]),))
  assert np.all(np.abs(new[0].numpy()) < 1.0)


def test_schedule_values():
  cfg = optimizers.OptimizerConfig('sgd', 1.0, schedule='exp_decay', decay_rate=0.5, decay_steps=10)
  fn = optimizers.schedule_fn(cfg)
  np.testing.assert_allclose(fn(0).numpy(), 1.0)
  np.testing.assert_allclose(fn(10).numpy(), 0.5, rtol=1e-6)
  inv = optimizers.schedule_fn(optimizers.OptimizerConfig('sgd', 1.0, schedule='inv_sqrt', decay_steps=1))
  np.testing.assert_allclose(inv(3).numpy(), 0.5, rtol=1e-6)
  cos = optimizers.schedule_fn(optimizers.OptimizerConfig(
      'sgd', 1.0, schedule='warmup_cosine', warmup_steps=2, decay_steps=4))
  np.testing.assert_allclose(cos(0).numpy(), 0.5, rtol=1e-6)
  np.testing.assert_allclose(cos(6).numpy(), 0.0, atol=1e-6)


def test_scheduled_tff_optimizer_decays():
  cfg = optimizers.OptimizerConfig('sgd', 1.0, schedule='exp_decay', decay_rate=0.1, decay_steps=1)
  opt = optimizers.build_optimizer(cfg)
  spec = (tf.TensorSpec([1], tf.float32),)
  state = opt.initialize(spec)
  w = (tf.constant([0.0]),)
  g = (tf.constant([1.0]),)
  state, w1 = opt.next(state, w, g)
  state, w2 = opt.next(state, w1, g)
  np.testing.assert_allclose(w1[0].numpy(), [-1.0], rtol=1e-6)
  np.testing.assert_allclose((w2[0] - w1[0]).numpy(), [-0.1], rtol=1e-5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='bogus'), 'unknown optimizer'),
    (dict(learning_rate=0.0), 'positive'),
    (dict(schedule='bogus'), 'unknown schedule'),
])
def test_invalid(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optimizers.OptimizerConfig(**kwargs)


def test_keras_counterpart():
  assert isinstance(optimizers.build_keras_optimizer(optimizers.OptimizerConfig('adam', 0.01)),
                    tf.keras.optimizers.Adam)
  with pytest.raises(ValueError, match='yogi'):
    optimizers.build_keras_optimizer(optimizers.OptimizerConfig('yogi', 0.01))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
