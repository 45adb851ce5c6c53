"""Central DP-SGD baseline: Bu, Dong, Long, Su (HDSR 2020) on MovieLens.

The model is TF Privacy's MovieLens tutorial NCF
(`tff_rec.models.neumf.build_ncf_softmax_rating`: MF branch of dim 5, MLP
embeddings of dim 10, 5-way softmax over the rating, expected rating as the
prediction), trained with Adam on the softmax cross-entropy of the rating
class.

Sampling and the accountant. Every step draws a Poisson batch: each unit
independently with probability q = batch_size / num_units (as the tutorial
does; Keras' shuffled fixed-size batches would not match the accountant).
An epoch is floor(num_units / batch_size) steps. ε is reported for
add/remove-one adjacency of a unit by `privacy.accounting.dpsgd_epsilon`
(RDP and PLD, upper bounds) and by the CLT of Bu et al.
(`dpsgd_epsilon_clt`, an approximation, not a bound).

Units:
* 'example' (the paper): a unit is one rating. Per-example gradients are
  clipped with TF Privacy's fast gradient clipping (`DPModel` with a layer
  registry covering the embedding tables and the dense head); Gaussian noise
  of std `noise_multiplier * l2_norm_clip` is added to the clipped *sum*
  (SUM loss reduction, no data-dependent denominator; Adam is invariant to
  the constant scale). The guarantee is per rating: a user with k ratings
  gets roughly k times the ε (group privacy), so this is not user-level DP.
* 'user': a unit is one user with all of their training ratings. Users are
  Poisson-sampled with q = batch_size / num_users; each sampled user's
  microbatch is all of their ratings, its loss the mean over them, and its
  gradient is clipped as a whole (`clip_and_aggregate_gradients`), so the ε
  is user-level. This is not "group the examples of an example-sampled
  batch by user": there a user's ratings are spread over many batches and a
  user is sampled with a probability growing with their number of ratings,
  so the example-level accountant would not apply to users.

Empty Poisson batches take a noise-only step (skipping it would reveal that
the batch was empty).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as layer_registry_lib
from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import embedding as embedding_registry
from tensorflow_privacy.privacy.keras_models import dp_keras_model
from tensorflow_privacy.privacy.optimizers import clip_and_aggregate_gradients as clip_lib

from privacy import accounting
from tff_rec import atomic
from tff_rec.data import errors
from tff_rec.data import ratings as ratings_lib
from tff_rec.models import base
from tff_rec.models import neumf
from tff_rec.models import predictions

UNITS = ('example', 'user')
RATING_VALUES = (1.0, 2.0, 3.0, 4.0, 5.0)

# Bu et al. (2020), Table / TF Privacy tutorial: ML-1M, 80/20 random split.
PUBLISHED = {
    'dataset': 'ml-1m',
    'test_rmse_dp': 0.915,
    'test_rmse_non_private': 0.893,
    'epsilon_clt': 10.6,
    'epsilon_moments_accountant': 15.4,
    'delta': 1e-6,
}


@dataclasses.dataclass(frozen=True)
class DpSgdConfig:
  """One DP-SGD (or, with noise_multiplier=0, non-private) training run.

  batch_size is the expected number of units (ratings or users) per step.
  noise_multiplier=0 trains without clipping or noise (plain Adam on the
  mean loss) and reports ε = inf.
  """

  noise_multiplier: float = 0.55
  l2_norm_clip: float = 5.0
  learning_rate: float = 0.01
  batch_size: int = 10000
  epochs: int = 20
  delta: float = 1e-6
  unit: str = 'example'
  mf_dim: int = 5
  mlp_dim: int = 10
  seed: int = 0
  eval_every_epoch: bool = True
  eval_batch_size: int = 65536

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f'unit must be one of {list(UNITS)}, got {self.unit!r}')
    for name in ('batch_size', 'epochs', 'mf_dim', 'mlp_dim', 'eval_batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
      raise ValueError(f'noise_multiplier must be >= 0, got {self.noise_multiplier}')
    if not self.l2_norm_clip > 0:
      raise ValueError(f'l2_norm_clip must be > 0, got {self.l2_norm_clip}')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')
    if not 0 < self.delta < 1:
      raise ValueError(f'delta must be in (0, 1), got {self.delta}')

  @property
  def private(self) -> bool:
    return self.noise_multiplier > 0


# ---------------------------------------------------------------------------
# Plan and privacy.


def steps_per_epoch(num_units: int, batch_size: int) -> int:
  """floor(num_units / batch_size) (at least 1), as in the tutorial."""
  if batch_size > num_units:
    raise ValueError(f'batch_size={batch_size} exceeds the {num_units} units')
  return max(1, num_units // batch_size)


def privacy_report(config: DpSgdConfig, num_units: int, steps: int) -> dict:
  """ε of `steps` Poisson-sampled steps by RDP, PLD and the CLT estimate."""
  q = config.batch_size / num_units
  report = {
      'unit': config.unit,
      'adjacency': f'add or remove one {"rating" if config.unit == "example" else "user"}',
      'sampling': 'poisson',
      'sampling_probability': q,
      'steps': int(steps),
      'noise_multiplier': config.noise_multiplier,
      'l2_norm_clip': config.l2_norm_clip,
      'delta': config.delta,
  }
  if not config.private:
    report.update(epsilon_rdp=math.inf, epsilon_pld=math.inf, epsilon_clt=math.inf)
    return report
  if steps == 0:
    report.update(epsilon_rdp=0.0, epsilon_pld=0.0, epsilon_clt=0.0)
    return report
  nm = config.noise_multiplier
  report['epsilon_rdp'] = accounting.dpsgd_epsilon(nm, q, steps, config.delta, 'rdp')
  report['epsilon_pld'] = accounting.dpsgd_epsilon(nm, q, steps, config.delta, 'pld')
  try:
    report['epsilon_clt'] = accounting.dpsgd_epsilon_clt(nm, q, steps, config.delta)
  except ValueError:
    report['epsilon_clt'] = None
  return report


def poisson_batches(num_units: int, q: float, steps: int,
                    rng: np.random.Generator) -> Iterator[np.ndarray]:
  """`steps` sorted index arrays, each unit in with probability q."""
  for _ in range(steps):
    yield np.flatnonzero(rng.random(num_units) < q)


# ---------------------------------------------------------------------------
# Model.


def rating_classes(ratings: np.ndarray) -> np.ndarray:
  """int32 class index (rating - 1) of integer ratings 1..5; DataError otherwise."""
  r = np.asarray(ratings)
  classes = np.rint(r).astype(np.int64) - 1
  if r.size and (np.any(np.abs(r - np.rint(r)) > 1e-6) or classes.min() < 0 or classes.max() > 4):
    raise errors.DataError('the softmax model needs integer ratings 1..5 (MovieLens 1M); '
                           f'got values in [{r.min()}, {r.max()}]')
  return classes.astype(np.int32)


def build_model(num_users: int, num_items: int, config: DpSgdConfig):
  """The DP-SGD baseline's NCF-softmax model.

  Args:
    num_users: Users.
    num_items: Items.
    config: Its sizes and seed.

  Returns:
    (the `RecModel` predicting E[rating], the Keras model of the 5 rating
    logits that DP-SGD trains).
  """
  rec = neumf.build_ncf_softmax_rating(
      num_users, num_items, mf_dim=config.mf_dim, mlp_dim=config.mlp_dim,
      rating_values=RATING_VALUES, seed=config.seed)
  return rec, neumf.rating_logits_model(rec)


def layer_registry() -> layer_registry_lib.LayerRegistry:
  """TF Privacy's fast-clipping registry plus our `EmbeddingLookup` tables.

  `EmbeddingLookup` without L2 is `tf.nn.embedding_lookup` of its single
  table, which is what the Keras `Embedding` registry function computes.
  """
  registry = layer_registry_lib.make_default_layer_registry()
  registry.insert(base.EmbeddingLookup, embedding_registry.embedding_layer_computation)
  return registry


def _inputs(r: ratings_lib.Ratings, idx: Optional[np.ndarray] = None) -> dict:
  if idx is None:
    return {'user': r.users, 'item': r.items}
  return {'user': r.users[idx], 'item': r.items[idx]}


def predict_ratings(rec, r: ratings_lib.Ratings, batch_size: int = 65536) -> np.ndarray:
  """Expected ratings of the pairs of `r`."""
  if r.num_ratings == 0:
    return np.zeros(0, np.float32)
  return np.asarray(rec.keras_model.predict(_inputs(r), batch_size=batch_size, verbose=0))


def rmse(rec, r: ratings_lib.Ratings, batch_size: int = 65536) -> float:
  """Root mean squared error of the expected rating on `r`."""
  if r.num_ratings == 0:
    raise ValueError(f'{r.name}: no ratings to evaluate')
  pred = predict_ratings(rec, r, batch_size)
  return predictions.rating_metrics(pred, r.ratings)['rmse']


# ---------------------------------------------------------------------------
# Training steps.


class _ExampleTrainer:
  """Per-example DP-SGD with fast gradient clipping (or plain Adam)."""

  def __init__(self, logits_model: tf.keras.Model, config: DpSgdConfig):
    self.config = config
    if config.private:
      self.model = dp_keras_model.DPModel(
          config.l2_norm_clip, config.noise_multiplier, None, False, layer_registry(),
          inputs=logits_model.inputs, outputs=logits_model.outputs)
      if not self.model._enable_fast_peg_computation:  # pylint: disable=protected-access
        raise RuntimeError('fast gradient clipping is not available for this model')
      loss = tf.keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, reduction=tf.keras.losses.Reduction.SUM)
    else:
      self.model = logits_model
      loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    self.model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate), loss=loss)

  def step(self, r: ratings_lib.Ratings, labels: np.ndarray, idx: np.ndarray) -> None:
    if len(idx) == 0:
      if self.config.private:
        _noise_only_step(self.model, self.config)
      return
    self.model.train_on_batch(_inputs(r, idx), labels[idx])


def _noise_only_step(model: tf.keras.Model, config: DpSgdConfig) -> None:
  """The update of an empty batch: the Gaussian noise alone."""
  stddev = config.noise_multiplier * config.l2_norm_clip
  variables = model.trainable_variables
  grads = [tf.random.normal(v.shape, stddev=stddev) for v in variables]
  model.optimizer.apply_gradients(zip(grads, variables))


class _UserTrainer:
  """User-level DP-SGD: one microbatch = all training ratings of a sampled user."""

  def __init__(self, logits_model: tf.keras.Model, config: DpSgdConfig):
    self.config = config
    self.model = logits_model
    self.optimizer = tf.keras.optimizers.Adam(config.learning_rate)
    self.model.compile(optimizer=self.optimizer)
    self._step = tf.function(self._train_step, reduce_retracing=True)

  def _train_step(self, users, items, labels, segments, num_segments):
    variables = self.model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
      logits = self.model({'user': users, 'item': items}, training=True)
      per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
      per_user = tf.math.unsorted_segment_mean(per_example, segments, num_segments)
    if self.config.private:
      grads = clip_lib.clip_and_aggregate_gradients(
          tape, per_user, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
          l2_norm_clip=self.config.l2_norm_clip, aggregate_method='sum',
          keep_sparse_threshold=-1)
      stddev = self.config.noise_multiplier * self.config.l2_norm_clip
      grads = [tf.convert_to_tensor(g) + tf.random.normal(tf.shape(v), stddev=stddev)
               for g, v in zip(grads, variables)]
    else:
      grads = tape.gradient(tf.reduce_mean(per_user), variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads = [tf.convert_to_tensor(g) for g in grads]
    del tape
    self.optimizer.apply_gradients(zip(grads, variables))

  def step(self, r: ratings_lib.Ratings, labels: np.ndarray, offsets: np.ndarray,
           users: np.ndarray) -> None:
    if len(users) == 0:
      if self.config.private:
        _noise_only_step(self.model, self.config)
      return
    rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in users])
    segments = np.repeat(np.arange(len(users), dtype=np.int32), offsets[users + 1] - offsets[users])
    self._step(tf.constant(r.users[rows]), tf.constant(r.items[rows]),
               tf.constant(labels[rows]), tf.constant(segments),
               tf.constant(len(users), tf.int32))


# ---------------------------------------------------------------------------
# Training run.


@dataclasses.dataclass
class DpSgdResult:
  """Outcome of `train`: final test RMSE, per-epoch history, privacy."""

  config: DpSgdConfig
  test_rmse: float
  history: list
  privacy: dict
  num_units: int
  steps: int
  seconds: float
  seconds_per_epoch: float
  rec: Any = dataclasses.field(default=None, repr=False)

  def to_json(self) -> dict:
    return {
        'config': dataclasses.asdict(self.config),
        'test_rmse': self.test_rmse,
        'history': self.history,
        'privacy': self.privacy,
        'num_units': self.num_units,
        'steps': self.steps,
        'seconds': self.seconds,
        'seconds_per_epoch': self.seconds_per_epoch,
        'published': PUBLISHED,
    }


def train(train_ratings: ratings_lib.Ratings, test_ratings: ratings_lib.Ratings,
          config: DpSgdConfig,
          on_epoch: Optional[Callable[[dict], None]] = None) -> DpSgdResult:
  """Trains per `config` on `train_ratings`; test RMSE after every epoch."""
  started = time.time()
  tf.keras.utils.set_random_seed(config.seed)
  rng = np.random.default_rng([config.seed, 2020])
  rec, logits_model = build_model(train_ratings.num_users, train_ratings.num_items, config)
  if config.unit == 'user':
    data = train_ratings.sorted_by_user()
    offsets = data.user_offsets()
    population = np.flatnonzero(np.diff(offsets) > 0)
    num_units = len(population)
    trainer = _UserTrainer(logits_model, config)
  else:
    data = train_ratings
    num_units = data.num_ratings
    trainer = _ExampleTrainer(logits_model, config)
  labels = rating_classes(data.ratings)
  per_epoch = steps_per_epoch(num_units, config.batch_size)
  q = config.batch_size / num_units
  history = []
  epoch_seconds = []
  for epoch in range(1, config.epochs + 1):
    t = time.time()
    for idx in poisson_batches(num_units, q, per_epoch, rng):
      if config.unit == 'user':
        trainer.step(data, labels, offsets, population[idx])
      else:
        trainer.step(data, labels, idx)
    epoch_seconds.append(time.time() - t)
    steps = epoch * per_epoch
    if config.eval_every_epoch or epoch == config.epochs:
      entry = {'epoch': epoch, 'steps': steps, 'seconds': epoch_seconds[-1]}
      if test_ratings.num_ratings:
        entry['test_rmse'] = rmse(rec, test_ratings, config.eval_batch_size)
      p = privacy_report(config, num_units, steps)
      entry.update({k: p[k] for k in ('epsilon_rdp', 'epsilon_pld', 'epsilon_clt')})
      history.append(entry)
      if on_epoch is not None:
        on_epoch(entry)
  steps = config.epochs * per_epoch
  test = rmse(rec, test_ratings, config.eval_batch_size) if test_ratings.num_ratings else math.nan
  return DpSgdResult(
      config=config,
      test_rmse=test,
      history=history,
      privacy=privacy_report(config, num_units, steps),
      num_units=num_units,
      steps=steps,
      seconds=time.time() - started,
      seconds_per_epoch=float(np.mean(epoch_seconds)),
      rec=rec,
  )


# ---------------------------------------------------------------------------
# Results.


def _fmt(x: Any, digits: int = 4) -> str:
  if x is None:
    return '-'
  if isinstance(x, float):
    return 'inf' if math.isinf(x) else f'{x:.{digits}f}'
  return str(x)


def result_markdown(result: DpSgdResult, extra: Optional[dict] = None) -> str:
  """A short Markdown summary of a run (with the published numbers)."""
  c, p = result.config, result.privacy
  lines = [
      '# DP-SGD on MovieLens (Bu et al. 2020 / TF Privacy tutorial)',
      '',
      f'- unit of privacy: {c.unit} ({p["adjacency"]}), Poisson sampling q = '
      f'{p["sampling_probability"]:.6g}, {result.steps} steps '
      f'({c.epochs} epochs), delta = {c.delta:g}',
      f'- noise multiplier {c.noise_multiplier:g}, clip {c.l2_norm_clip:g}, Adam lr '
      f'{c.learning_rate:g}, expected batch {c.batch_size}',
      f'- time: {result.seconds:.0f} s total, {result.seconds_per_epoch:.1f} s per epoch',
      '',
      '| | test RMSE | ε (RDP) | ε (PLD) | ε (CLT, approx.) |',
      '|---|---|---|---|---|',
      f'| this run | {_fmt(result.test_rmse)} | {_fmt(p["epsilon_rdp"], 2)} | '
      f'{_fmt(p["epsilon_pld"], 2)} | {_fmt(p["epsilon_clt"], 2)} |',
      f'| published (DP) | {PUBLISHED["test_rmse_dp"]} | {PUBLISHED["epsilon_moments_accountant"]} '
      f'(moments acc.) | - | {PUBLISHED["epsilon_clt"]} |',
      f'| published (non-private) | {PUBLISHED["test_rmse_non_private"]} | - | - | - |',
      '',
      '| epoch | test RMSE | ε (RDP) | ε (PLD) | ε (CLT) | seconds |',
      '|---|---|---|---|---|---|',
  ]
  for h in result.history:
    lines.append(f'| {h["epoch"]} | {_fmt(h.get("test_rmse"))} | {_fmt(h["epsilon_rdp"], 2)} | '
                 f'{_fmt(h["epsilon_pld"], 2)} | {_fmt(h["epsilon_clt"], 2)} | '
                 f'{h["seconds"]:.1f} |')
  for k, v in (extra or {}).items():
    lines.append(f'- {k}: {v}')
  return '\n'.join(lines) + '\n'


def write_result(result: DpSgdResult, output_dir: str, extra: Optional[dict] = None) -> tuple[str, str]:
  """Writes result.json and result.md atomically; returns their paths."""
  record = result.to_json()
  record.update(extra or {})
  json_path = os.path.join(output_dir, 'result.json')
  md_path = os.path.join(output_dir, 'result.md')
  # Strict JSON; the ε of a run without noise is infinite: written as "inf".
  atomic.write_json(json_path, record, inf_as_string=True)
  atomic.write(md_path, result_markdown(result, extra))
  return json_path, md_path
