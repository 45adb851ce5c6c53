"""Central (non-federated) Keras baselines on the same splits as federated runs."""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
import time
from typing import Optional

from absl import logging
import tensorflow as tf
import tqdm

from tff_rec import atomic
from tff_rec import version
from tff_rec.data import centralized
from tff_rec.data import splits as splits_lib
from tff_rec.models import base
from tff_rec.models import metrics as metrics_lib
from tff_rec.models import predictions
from tff_rec.training import artifacts
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import model_fns
from tff_rec.training import optimizers


@dataclasses.dataclass(frozen=True)
class CentralConfig:
  """A central baseline run (the flags of run_centralized)."""

  data: data_setup.DataConfig = data_setup.DataConfig()
  model: experiment.ModelConfig = experiment.ModelConfig()
  optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig('adam', 0.001)
  epochs: int = 10
  batch_size: int = 256
  negatives_per_positive: int = 4  # implicit models only
  top_k: int = 10
  root_output_dir: str = 'runs'
  experiment_name: str = 'central'
  seed: int = 0
  progress_bar: bool = True

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'top_k'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.negatives_per_positive < 0:
      raise ValueError('negatives_per_positive must be >= 0')

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)


def evaluate(model: tf.keras.Model, task: str, split: splits_lib.Split, part: str, top_k: int) -> dict:
  """Test metrics of a model over users seen in training."""
  r = getattr(split, part)
  if task == base.TASK_RATING:
    # Unclipped: the one rating-metrics rule (tff_rec/models/predictions.py).
    return predictions.rating_metrics(predictions.predict(model, r.users, r.items), r.ratings)
  if split.negatives is None:
    raise ValueError('implicit models are evaluated on leave-one-out splits with negatives')
  score_fn = lambda u, i: predictions.predict(model, u, i)
  result = metrics_lib.hit_rate_and_ndcg_sampled(score_fn, r.users, r.items, split.negatives, top_k)
  return {f'hr@{top_k}': result['hit_rate'], f'ndcg@{top_k}': result['ndcg'],
          'num_users': int(len(r.users))}


@dataclasses.dataclass
class CentralResult:
  run_dir: str
  test_metrics: dict
  history: list
  model: tf.keras.Model
  final_model_dir: str
  seconds: float


def run_central(config: CentralConfig, split: Optional[splits_lib.Split] = None) -> CentralResult:
  """Trains the model centrally on split.train; evaluates each epoch; saves it."""
  started = time.time()
  split = split or data_setup.load_split(config.data)
  if split.heldout_users:
    raise ValueError(
        'central baselines need test users seen in training; use --split=random/by_time/'
        'leave_one_out (held-out users are evaluated with reconstruction in run_federated)'
    )
  fed_like = experiment.FederatedConfig(data=config.data, model=config.model, seed=config.seed)
  spec = experiment.model_spec(fed_like, split)
  rec = spec.build(model_fns.UserEmbedding.TABLE)
  model = rec.keras_model
  task = spec.task
  negatives = config.negatives_per_positive if task == base.TASK_IMPLICIT else 0
  model.compile(optimizer=optimizers.build_keras_optimizer(config.optimizer),
                loss=model_fns.loss_fn(task)())
  run_dir = config.run_dir
  os.makedirs(run_dir, exist_ok=True)
  artifacts.write_json(os.path.join(run_dir, 'hparams.json'), {
      'config': dataclasses.asdict(config), 'split': split.summary(),
      'versions': version.installed_versions()})
  eval_part = 'val' if split.val.num_ratings else 'test'
  history = []
  bar = tqdm.trange(config.epochs, desc='central', unit='epoch', disable=not config.progress_bar)
  for epoch in bar:
    # Fresh negatives every epoch, as in the NCF recipe.
    ds = centralized.keras_dataset(split.train, config.batch_size, seed=config.seed + epoch,
                                   negatives_per_positive=negatives)
    fit = model.fit(ds, epochs=1, verbose=0)
    row = collections.OrderedDict(epoch=epoch + 1, loss=float(fit.history['loss'][-1]))
    row.update({f'{eval_part}/{k}': v for k, v in evaluate(model, task, split, eval_part, config.top_k).items()})
    history.append(row)
    bar.set_postfix({k: f'{v:.4f}' for k, v in row.items() if isinstance(v, float)}, refresh=False)
  bar.close()
  _write_history(os.path.join(run_dir, 'metrics.csv'), history)
  test_metrics = evaluate(model, task, split, 'test', config.top_k)
  artifacts.write_json(os.path.join(run_dir, 'test_metrics.json'), test_metrics)
  final_dir = artifacts.save_final_model(run_dir, model, split.train, {
      'model': config.model.name, 'hparams': dict(spec.builder.keywords), 'task': task,
      'num_users': spec.num_users, 'num_items': spec.num_items,
      'user_embedding': model_fns.UserEmbedding.TABLE.value, 'algorithm': 'central',
      'epochs': config.epochs, 'seed': config.seed,
      'rating_scale': list(split.train.rating_scale), 'test_metrics': test_metrics})
  logging.info('central %s: %s', config.model.name, test_metrics)
  return CentralResult(run_dir, test_metrics, history, model, final_dir, time.time() - started)


def _write_history(path: str, rows: list) -> None:
  keys = list(rows[0].keys()) if rows else ['epoch']
  out = io.StringIO(newline='')
  writer = csv.DictWriter(out, fieldnames=keys)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write(path, out.getvalue())
