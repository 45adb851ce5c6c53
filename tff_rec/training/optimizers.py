"""TFF optimizers by name, with optional learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adagrad', 'yogi')
SCHEDULES = ('constant', 'exp_decay', 'inv_sqrt', 'warmup_cosine')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """An optimizer name, learning rate and schedule (steps count per apply)."""

  name: str = 'sgd'
  learning_rate: float = 0.1
  momentum: float = 0.9  # only for 'momentum'
  schedule: str = 'constant'
  decay_rate: float = 0.5  # exp_decay: lr * decay_rate ** (step / decay_steps)
  decay_steps: int = 100  # exp_decay period, inv_sqrt scale, cosine length
  warmup_steps: int = 0  # warmup_cosine

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f'unknown optimizer {self.name!r}; valid: {", ".join(OPTIMIZERS)}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'unknown schedule {self.schedule!r}; valid: {", ".join(SCHEDULES)}')
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f'learning rate must be finite and positive, got {self.learning_rate}')
    if self.decay_steps <= 0:
      raise ValueError(f'decay_steps must be positive, got {self.decay_steps}')


def schedule_fn(config: OptimizerConfig) -> Callable[[tf.Tensor], tf.Tensor]:
  """The learning rate as a function of the optimizer's step count."""
  lr = config.learning_rate

  def fn(step):
    step = tf.cast(step, tf.float32)
    if config.schedule == 'constant':
      return tf.constant(lr, tf.float32)
    if config.schedule == 'exp_decay':
      return lr * tf.pow(config.decay_rate, step / float(config.decay_steps))
    if config.schedule == 'inv_sqrt':
      return lr / tf.sqrt(1.0 + step / float(config.decay_steps))
    # warmup_cosine
    warm = float(max(config.warmup_steps, 0))
    warm_lr = lr * (step + 1.0) / max(warm, 1.0)
    progress = tf.clip_by_value((step - warm) / float(config.decay_steps), 0.0, 1.0)
    cos_lr = 0.5 * lr * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < warm, warm_lr, cos_lr)

  return fn


def build_optimizer(config: OptimizerConfig) -> tff.learning.optimizers.Optimizer:
  """A `tff.learning.optimizers.Optimizer` for the config."""
  lr = config.learning_rate
  if config.name == 'sgd':
    opt = tff.learning.optimizers.build_sgdm(learning_rate=lr)
  elif config.name == 'momentum':
    opt = tff.learning.optimizers.build_sgdm(learning_rate=lr, momentum=config.momentum)
  elif config.name == 'adam':
    opt = tff.learning.optimizers.build_adam(learning_rate=lr)
  elif config.name == 'adagrad':
    opt = tff.learning.optimizers.build_adagrad(learning_rate=lr)
  else:
    opt = tff.learning.optimizers.build_yogi(learning_rate=lr)
  if config.schedule != 'constant':
    opt = tff.learning.optimizers.schedule_learning_rate(opt, schedule_fn(config))
  return opt


def build_keras_optimizer(config: OptimizerConfig) -> tf.keras.optimizers.Optimizer:
  """The Keras optimizer matching `config`, for central baselines."""
  lr = config.learning_rate
  if config.schedule != 'constant':
    fn = schedule_fn(config)

    class _Schedule(tf.keras.optimizers.schedules.LearningRateSchedule):

      def __call__(self, step):
        return fn(step)

      def get_config(self):
        return dataclasses.asdict(config)

    lr = _Schedule()
  if config.name == 'sgd':
    return tf.keras.optimizers.SGD(lr)
  if config.name == 'momentum':
    return tf.keras.optimizers.SGD(lr, momentum=config.momentum)
  if config.name == 'adam':
    return tf.keras.optimizers.Adam(lr)
  if config.name == 'adagrad':
    return tf.keras.optimizers.Adagrad(lr)
  # Keras has no Yogi; Adam is its closest relative.
  raise ValueError('yogi is only available for federated optimizers (TFF), not Keras baselines')
