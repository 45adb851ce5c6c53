"""Central training and evaluation of sequential recommenders (SASRec) on `SequenceSplit`s.

The loop is the reference's (github kang205/SASRec, `main.py`, `sampler.py`):

* an epoch is `num_users // batch_size` steps (`main.py:38`); each batch
  draws users uniformly with replacement among those with at least two
  training items (`sampler.py:16-17`);
* a user's input window is the last `maxlen` training items but one, the
  targets are the same window shifted by one, and each target position gets
  a negative drawn uniformly from the items outside the user's training set
  (`sampler.py:19-31`);
* Adam with lr 0.001 and beta_2 0.98 (`model.py:106`);
* every `eval_every` epochs the validation and test items are ranked
  (`main.py:68`, `util.py`); we report the test metrics of the evaluation
  with the best validation HR@10, and also full-ranking HR@10 / NDCG@10 over
  every item outside the user's history (the ranked item's own sequence).

Ranks are pessimistic, as everywhere in the toolkit: a held-out item is
placed after every candidate with an equal score. Non-finite scores or a
non-finite loss stop training with an error.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
import tqdm

from tff_rec.data import sequences
from tff_rec.models import registry
from tff_rec.models import sasrec


ITEM_TEXT_MODES = ('none', 'init', 'input')


@dataclasses.dataclass(frozen=True)
class SequentialConfig:
  """A central sequential-recommendation run; defaults are SASRec's ML-1M setting.

  Attributes:
    model: Registry name (`registry.SEQUENTIAL_MODEL_NAMES`).
    hparams: The model's hyperparameters (maxlen, hidden_units, num_blocks,
      num_heads, dropout, positional).
    loss: 'bce' (one negative per position) or 'sampled_softmax'.
    num_negatives: Negatives per position for 'sampled_softmax'.
    learning_rate: Adam learning rate.
    beta_2: Adam beta_2.
    batch_size: Sequences per step.
    epochs: Epochs of `num_users // batch_size` steps.
    eval_every: Evaluate every this many epochs (and after the last).
    top_k: K of HR@K and NDCG@K.
    eval_batch_size: Users per evaluation batch.
    seed: Seed of initialization, sampling and dropout.
    item_text: How language-model text features of the items are used:
      'none'; 'init' (the item table starts at their top principal
      components, a fixed projection); 'input' (an item's vector is a free
      row, starting at zero, plus a learned projection of its features, so
      untrained items keep a representation).
    progress_bar: Show a progress bar over epochs.
  """

  model: str = 'sasrec'
  hparams: dict = dataclasses.field(default_factory=lambda: dict(
      maxlen=200, hidden_units=50, num_blocks=2, num_heads=1, dropout=0.2, positional=True))
  loss: str = 'bce'
  num_negatives: int = 1
  learning_rate: float = 0.001
  beta_2: float = 0.98
  batch_size: int = 128
  epochs: int = 200
  eval_every: int = 20
  top_k: int = 10
  eval_batch_size: int = 256
  seed: int = 0
  item_text: str = 'none'
  progress_bar: bool = True

  def __post_init__(self):
    if self.item_text not in ITEM_TEXT_MODES:
      raise ValueError(f'unknown item_text {self.item_text!r}; valid: {", ".join(ITEM_TEXT_MODES)}')
    if self.loss not in sasrec.LOSSES:
      raise ValueError(f'unknown loss {self.loss!r}; valid: {", ".join(sasrec.LOSSES)}')
    for what in ('num_negatives', 'batch_size', 'epochs', 'eval_every', 'top_k', 'eval_batch_size'):
      if getattr(self, what) < 1:
        raise ValueError(f'{what} must be >= 1, got {getattr(self, what)}')
    if self.loss == 'bce' and self.num_negatives != 1:
      raise ValueError('loss "bce" takes exactly one negative per position (num_negatives=1)')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')

  @property
  def maxlen(self) -> int:
    return int(self.hparams.get('maxlen', 200))


def config_dict(config: SequentialConfig) -> dict:
  """The configuration as JSON-ready values (without the progress-bar switch)."""
  out = dataclasses.asdict(config)
  del out['progress_bar']
  return out


class TrainingSampler:
  """Batches of (window, next items, negatives) as in the reference's `sampler.py`."""

  def __init__(self, split: sequences.SequenceSplit, maxlen: int, *, num_negatives: int = 1,
               seed: int = 0):
    self._train = split.train
    self._maxlen = maxlen
    self._num_items = split.num_items
    self._num_negatives = num_negatives
    self._rng = np.random.default_rng(seed)
    self._users = np.array([u for u, s in enumerate(split.train) if len(s) >= 2], np.int64)
    if not self._users.size:
      raise ValueError(f'{split.name}: no user has two training items to learn a transition from')
    # Sorted keys user * (num_items + 1) + item of every training pair (negatives avoid them).
    width = split.num_items + 1
    keys = [u * width + np.unique(s).astype(np.int64) for u, s in enumerate(split.train) if len(s)]
    self._keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    self._width = width
    # Cold items (held out of training) are never negatives either.
    self._cold = split.cold_items.astype(np.int64)

  @property
  def trainable_users(self) -> int:
    return int(self._users.size)

  def _negatives(self, users: np.ndarray, shape: tuple) -> np.ndarray:
    out = self._rng.integers(1, self._num_items + 1, size=shape + (self._num_negatives,))
    users = np.broadcast_to(users.reshape((-1,) + (1,) * len(shape)), out.shape)
    todo = np.ones(out.shape, bool)
    for _ in range(1000):
      keys = users[todo] * self._width + out[todo]
      pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
      clash = self._keys[pos] == keys
      if self._cold.size:
        clash |= np.isin(out[todo], self._cold)
      idx = np.flatnonzero(todo)
      todo[:] = False
      todo.flat[idx[clash]] = True
      if not todo.any():
        return out.astype(np.int32)
      out[todo] = self._rng.integers(1, self._num_items + 1, size=int(todo.sum()))
    raise ValueError('could not draw negatives outside a user\'s training set (the user rated '
                     'almost every item)')

  @property
  def trainable_user_ids(self) -> np.ndarray:
    """Users with at least two training items (those a transition can be learned from)."""
    return self._users.copy()

  def _windows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seq = np.stack([sequences.left_padded(self._train[u][:-1], self._maxlen) for u in users])
    pos = np.stack([sequences.left_padded(self._train[u][1:], self._maxlen) for u in users])
    neg = self._negatives(users, (len(users), self._maxlen)) * (pos[..., None] > 0)
    if self._num_negatives == 1:
      neg = neg[..., 0]
    return seq, pos, neg.astype(np.int32)

  def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(seq, pos, neg)`: int32 [B, maxlen] twice and [B, maxlen] (or [B, maxlen, K])."""
    return self._windows(self._rng.choice(self._users, size=batch_size))

  def user_batch(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One user's `(seq, pos, neg)` as a batch of one, with fresh negatives."""
    return self._windows(np.array([user], np.int64))


def _history_mask(split: sequences.SequenceSplit, users: np.ndarray, which: str) -> np.ndarray:
  """bool [U, num_items + 1]: the items a held-out item is ranked against in full ranking."""
  allowed = np.ones((users.size, split.num_items + 1), bool)
  allowed[:, 0] = False
  for row, u in enumerate(users):
    allowed[row, split.history(u, for_test=which == 'test')] = False
  return allowed


_SCORERS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _compiled_scorer(model) -> Callable:
  """`model.score_all` as one traced graph (kept on the model).

  Calling the Keras model eagerly batch after batch kept every batch's
  attention intermediates alive (about 2 GB per ML-1M evaluation on TF
  2.14, which ended a 200-epoch run out of memory); a `tf.function` with a
  fixed signature does not.
  """
  if not isinstance(model, tf.keras.Model):
    return model.score_all  # A plain scorer (tests' stand-ins).
  fn = _SCORERS.get(model)
  if fn is None:
    fn = tf.function(model.score_all, input_signature=[tf.TensorSpec([None, None], tf.int32)])
    _SCORERS[model] = fn
  return fn


def evaluate(model: sasrec.SASRec, split: sequences.SequenceSplit, *, which: str,
             maxlen: int, top_k: int = 10, batch_size: int = 256,
             users: Optional[np.ndarray] = None) -> dict[str, float]:
  """Sampled and full-ranking HR@K / NDCG@K of the held-out `which` item.

  Args:
    model: A SASRec-like model (`score_candidates`, `score_all`).
    split: The split.
    which: 'valid' or 'test'.
    maxlen: The model's input window.
    top_k: K.
    batch_size: Users per batch.
    users: Users to rank (default: every evaluated user).

  Returns:
    `{'hr@K', 'ndcg@K', 'full_hr@K', 'full_ndcg@K', 'users'}`.

  Raises:
    FloatingPointError: The model produced a non-finite score.
  """
  windows, candidates, users = sequences.eval_inputs(split, maxlen, which=which, users=users)
  if not users.size:
    raise ValueError(f'{split.name}: no user has a held-out {which} item')
  sampled_ranks, full_ranks = [], []
  score_all = _compiled_scorer(model)
  for start in range(0, users.size, batch_size):
    sl = slice(start, start + batch_size)
    scores = np.asarray(score_all(windows[sl]))
    if not np.all(np.isfinite(scores)):
      raise FloatingPointError(f'non-finite scores ranking the {which} items')
    rows = np.arange(scores.shape[0])
    cand = np.take_along_axis(scores, candidates[sl], axis=1)
    sampled_ranks.append(np.sum(cand[:, 1:] >= cand[:, :1], axis=1))
    target = scores[rows, candidates[sl, 0]]
    allowed = _history_mask(split, users[sl], which)
    allowed[rows, candidates[sl, 0]] = False
    full_ranks.append(np.sum((scores >= target[:, None]) & allowed, axis=1))
  out = {'users': int(users.size)}
  for prefix, ranks in (('', np.concatenate(sampled_ranks)), ('full_', np.concatenate(full_ranks))):
    hit = ranks < top_k
    out[f'{prefix}hr@{top_k}'] = float(hit.mean())
    out[f'{prefix}ndcg@{top_k}'] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)))
  return out


class BestValidation:
  """Evaluates the held-out items, keeps the history and the weights of the best validation HR@K.

  Shared by the central loop and `sequential_fedavg`: each evaluation ranks
  the validation and test items, appends a history row keyed by `step_key`
  ('epoch' or 'round'), and remembers the model's weights when validation
  HR@K improves.
  """

  def __init__(self, config: SequentialConfig, split: sequences.SequenceSplit, step_key: str,
               on_eval: Optional[Callable[[dict], Any]] = None):
    self._split = split
    self._step_key = step_key
    self._on_eval = on_eval
    self._key = f'hr@{config.top_k}'
    self.eval_kwargs = dict(maxlen=config.maxlen, top_k=config.top_k,
                            batch_size=config.eval_batch_size)
    self.history: list = []
    self.best_step = None
    self.valid = None
    self.test = None
    self._weights = None

  def evaluate(self, model: sasrec.SASRec, step: int, loss: float, seconds: float) -> dict:
    """Ranks the held-out items with `model`; returns the new history row."""
    valid = evaluate(model, self._split, which='valid', **self.eval_kwargs)
    test = evaluate(model, self._split, which='test', **self.eval_kwargs)
    row = {self._step_key: step, 'loss': loss, 'seconds': seconds,
           **{f'valid/{k}': v for k, v in valid.items()}, **{f'test/{k}': v for k, v in test.items()}}
    self.history.append(row)
    if self._on_eval is not None:
      self._on_eval(row)
    if self.valid is None or valid[self._key] > self.valid[self._key]:
      self.best_step, self.valid, self.test = step, valid, test
      self._weights = [w.copy() for w in model.get_weights()]
    return row

  def restore(self, model: sasrec.SASRec) -> None:
    """Sets `model` to the weights of the best evaluation."""
    model.set_weights(self._weights)


@dataclasses.dataclass
class SequentialResult:
  """What `train` returns.

  Attributes:
    model: The model restored to its best-validation weights.
    best_epoch: The epoch of the best validation HR@K.
    valid: Validation metrics at `best_epoch`.
    test: Test metrics at `best_epoch` (the reported numbers).
    history: One row per evaluation: epoch, loss, seconds, valid/* and test/*.
    seconds_per_epoch: Median training seconds per epoch.
    num_parameters: Trainable parameters.
    test_cold: With cold items: test metrics at `best_epoch` of the users
      whose test item is cold, else None.
    test_warm: Likewise for the users whose test item is warm.
  """

  model: sasrec.SASRec
  best_epoch: int
  valid: dict
  test: dict
  history: list
  seconds_per_epoch: float
  num_parameters: int
  test_cold: Optional[dict] = None
  test_warm: Optional[dict] = None


def principal_init(features: np.ndarray, dim: int) -> np.ndarray:
  """An item table `[N + 1, dim]` from features `[N + 1, F]`: their top principal components.

  Rows 1..N are centred and projected on their `dim` leading principal
  directions (a fixed projection), then scaled to the standard deviation of
  the Glorot-uniform table they replace; row 0 (padding) stays zero.

  Args:
    features: Item features, row 0 padding.
    dim: The table's width d (at most F).

  Returns:
    float32 `[N + 1, dim]`.
  """
  rows = np.asarray(features[1:], np.float64)
  if dim > rows.shape[1]:
    raise ValueError(f'cannot take {dim} principal components of {rows.shape[1]}-d features')
  centred = rows - rows.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  projected = centred @ vt[:dim].T
  target_std = math.sqrt(2.0 / (features.shape[0] + dim))
  projected *= target_std / max(float(projected.std()), 1e-12)
  return np.concatenate([np.zeros((1, dim)), projected]).astype(np.float32)


def build_model(config: SequentialConfig, split: sequences.SequenceSplit, *,
                item_text_features: Optional[np.ndarray] = None) -> sasrec.SASRec:
  """The config's model over the split's items.

  Args:
    config: The run's configuration.
    split: The split (its item count).
    item_text_features: `[num_items + 1, F]` text features of the items
      (row 0 padding); required unless `config.item_text == 'none'`.

  Returns:
    The built model.
  """
  kwargs = {}
  if config.item_text != 'none':
    if item_text_features is None:
      raise ValueError(f'item_text={config.item_text!r} needs the items\' text features')
    if item_text_features.shape[0] != split.num_items + 1:
      raise ValueError(f'item_text_features has {item_text_features.shape[0]} rows, expected '
                       f'{split.num_items + 1} (row 0 is padding)')
    if config.item_text == 'init':
      kwargs['item_init'] = principal_init(item_text_features,
                                           int(config.hparams.get('hidden_units', 50)))
    else:
      kwargs['item_features'] = item_text_features
  return registry.build_sequential_model(config.model, split.num_items, seed=config.seed,
                                         **kwargs, **config.hparams)


def train(config: SequentialConfig, split: sequences.SequenceSplit, *,
          item_text_features: Optional[np.ndarray] = None,
          on_eval: Optional[Callable[[dict], Any]] = None) -> SequentialResult:
  """Trains centrally and reports the test metrics at the best validation HR@K.

  Args:
    config: The run's configuration.
    split: Sequences with held-out items.
    item_text_features: `[num_items + 1, F]` text features of the items
      (row 0 padding), used as `config.item_text` says.
    on_eval: Called with each history row as it is made.

  Returns:
    The `SequentialResult`.

  Raises:
    FloatingPointError: The loss or a score became non-finite.
  """
  tf.keras.utils.set_random_seed(config.seed)
  model = build_model(config, split, item_text_features=item_text_features)
  optimizer = tf.keras.optimizers.Adam(config.learning_rate, beta_2=config.beta_2)
  sampler = TrainingSampler(split, config.maxlen, num_negatives=config.num_negatives,
                            seed=config.seed)
  neg_shape = [None, config.maxlen] + ([config.num_negatives] if config.loss != 'bce' else [])

  @tf.function(input_signature=[tf.TensorSpec([None, config.maxlen], tf.int32),
                                tf.TensorSpec([None, config.maxlen], tf.int32),
                                tf.TensorSpec(neg_shape, tf.int32)])
  def step(seq, pos, neg):
    with tf.GradientTape() as tape:
      loss = sasrec.sequence_loss(model, seq, pos, neg, loss=config.loss, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  steps = max(1, split.num_users // config.batch_size)
  book = BestValidation(config, split, 'epoch', on_eval)
  epoch_seconds = []
  bar = tqdm.trange(config.epochs, desc=config.model, unit='epoch', disable=not config.progress_bar)
  for epoch in range(1, config.epochs + 1):
    start = time.perf_counter()
    losses = [float(step(*sampler.batch(config.batch_size))) for _ in range(steps)]
    epoch_seconds.append(time.perf_counter() - start)
    loss = float(np.mean(losses))
    if not math.isfinite(loss):
      raise FloatingPointError(f'non-finite training loss at epoch {epoch}')
    bar.update(1)
    bar.set_postfix(loss=f'{loss:.4f}')
    if epoch % config.eval_every and epoch != config.epochs:
      continue
    book.evaluate(model, epoch, loss, float(np.sum(epoch_seconds)))
  bar.close()
  book.restore(model)
  by_item = {}
  if split.cold_items.size:
    for cold in (True, False):
      users = split.users_by_test_item(cold=cold)
      if users.size:
        by_item[cold] = evaluate(model, split, which='test', users=users, **book.eval_kwargs)
  return SequentialResult(
      model=model, best_epoch=book.best_step, valid=book.valid, test=book.test,
      history=book.history,
      seconds_per_epoch=float(np.median(epoch_seconds)),
      num_parameters=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
      test_cold=by_item.get(True), test_warm=by_item.get(False))
