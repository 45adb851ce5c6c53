"""Before/after numbers of a compressed export: size, parameters, accuracy, latency.

Each `ReportRow` describes one artifact (the float32 SavedModel baseline, the
compressed SavedModel, a TFLite file): bytes on disk (raw, and the sum of
each file gzip -9 compressed, which is what zeros from pruning buy), number
of parameters and nonzeros, accuracy on the test ratings measured through
the exported signatures (RMSE/MAE of `serving_default` for rating models,
HR@k / NDCG@k against sampled negatives for implicit ones), and the p50/p99
latency of single-user `recommend` (or `recommend_from_history`) requests
in this process. `write_report` writes CSV and Markdown atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
import time
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_rec import atomic
from tff_rec.data import ratings as ratings_lib
from tff_rec.export import serving
from tff_rec.models import metrics as metrics_lib
from tff_rec.models import predictions


@dataclasses.dataclass
class ReportRow:
  """One artifact's numbers (None where not measured)."""

  artifact: str
  path: str
  raw_bytes: int
  gzip_bytes: int
  params: Optional[int] = None
  nonzeros: Optional[int] = None
  metrics: dict = dataclasses.field(default_factory=dict)
  p50_ms: Optional[float] = None
  p99_ms: Optional[float] = None
  notes: str = ''

  def flat(self) -> dict:
    row = {'artifact': self.artifact, 'raw_bytes': self.raw_bytes, 'gzip_bytes': self.gzip_bytes,
           'params': self.params, 'nonzeros': self.nonzeros}
    row.update(self.metrics)
    row.update({'p50_ms': self.p50_ms, 'p99_ms': self.p99_ms, 'notes': self.notes, 'path': self.path})
    return row


def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  out = []
  for d, _, names in os.walk(path):
    out.extend(os.path.join(d, n) for n in sorted(names))
  return sorted(out)


def disk_bytes(path: str) -> tuple[int, int]:
  """(raw bytes, sum of gzip -9 bytes per file) of a file or directory tree."""
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  raw = zipped = 0
  for f in _files(path):
    with open(f, 'rb') as fh:
      data = fh.read()
    raw += len(data)
    zipped += len(gzip.compress(data, compresslevel=9, mtime=0))
  return raw, zipped


def param_counts(model: tf.keras.Model) -> tuple[int, int]:
  """(parameters, nonzero parameters) over all of a model's weights."""
  total = nonzero = 0
  for w in model.weights:
    a = w.numpy()
    total += a.size
    nonzero += int(np.count_nonzero(a))
  return total, nonzero


def _to_bytes(raw_ids: np.ndarray) -> np.ndarray:
  return np.array([str(r).encode() for r in raw_ids], dtype=object)


def predict_export(
    version_dir: str,
    model_config: Mapping,
    user_index: ratings_lib.IdIndex,
    item_index: ratings_lib.IdIndex,
    train: ratings_lib.Ratings,
    pairs: ratings_lib.Ratings,
    batch_size: int = 8192,
) -> np.ndarray:
  """`serving_default` predictions of an exported model for the (user, item) pairs.

  FedRecon exports get each user's training ratings as the history.
  """
  predict = serving.load_signature(version_dir, serving.SERVING_DEFAULT)
  users_raw, items_raw = user_index.raw_ids, item_index.raw_ids
  if model_config['user_embedding'] == 'local':
    preds = np.zeros(pairs.num_ratings, np.float32)
    train_sorted = train.sorted_by_user()
    offsets = train_sorted.user_offsets()
    for u in np.unique(pairs.users):
      rows = np.flatnonzero(pairs.users == u)
      lo, hi = offsets[u], offsets[u + 1]
      out = predict(
          history_item_id=tf.constant(_to_bytes(items_raw[train_sorted.items[lo:hi]]), tf.string),
          history_rating=tf.constant(train_sorted.ratings[lo:hi], tf.float32),
          item_id=tf.constant(_to_bytes(items_raw[pairs.items[rows]]), tf.string))
      preds[rows] = out['prediction'].numpy()
    return preds
  return _score_pairs(predict, users_raw, items_raw, pairs.users, pairs.items, batch_size)


def _score_pairs(predict, users_raw, items_raw, users, items, batch_size) -> np.ndarray:
  out = []
  for s in range(0, len(users), batch_size):
    res = predict(user_id=tf.constant(_to_bytes(users_raw[users[s:s + batch_size]]), tf.string),
                  item_id=tf.constant(_to_bytes(items_raw[items[s:s + batch_size]]), tf.string))
    out.append(res['prediction'].numpy())
  return np.concatenate(out) if out else np.zeros([0], np.float32)


def evaluate_export(
    version_dir: str,
    model_config: Mapping,
    user_index: ratings_lib.IdIndex,
    item_index: ratings_lib.IdIndex,
    train: ratings_lib.Ratings,
    test: ratings_lib.Ratings,
    negatives: Optional[np.ndarray] = None,
    top_k: int = 10,
    batch_size: int = 8192,
) -> dict:
  """Test metrics of an exported model, computed through its signatures."""
  if model_config['task'] == 'rating':
    preds = predict_export(version_dir, model_config, user_index, item_index, train, test, batch_size)
    # The export's `prediction` is clipped to the rating scale (what a user is
    # served; tff_rec/models/predictions.py), so these metrics are of clipped values.
    m = predictions.rating_metrics(preds, test.ratings)
    return {'rmse': m['rmse'], 'mae': m['mae']}
  if negatives is None or model_config['user_embedding'] == 'local':
    return {}
  predict = serving.load_signature(version_dir, serving.SERVING_DEFAULT)
  score = lambda u, i: _score_pairs(predict, user_index.raw_ids, item_index.raw_ids, u, i, batch_size)
  result = metrics_lib.hit_rate_and_ndcg_sampled(score, test.users, test.items, negatives, top_k)
  return {f'hr@{top_k}': result['hit_rate'], f'ndcg@{top_k}': result['ndcg']}


def recommend_latency(
    version_dir: str,
    model_config: Mapping,
    user_index: ratings_lib.IdIndex,
    item_index: ratings_lib.IdIndex,
    train: Optional[ratings_lib.Ratings] = None,
    k: int = 10,
    requests: int = 200,
    warmup: int = 10,
    seed: int = 0,
) -> tuple[float, float]:
  """(p50, p99) milliseconds of single-user top-k requests to the loaded SavedModel."""
  rng = np.random.default_rng(seed)
  if model_config['user_embedding'] == 'local':
    fn = serving.load_signature(version_dir, serving.RECOMMEND_FROM_HISTORY)
    if train is None:
      raise ValueError('FedRecon latency needs training ratings for the histories')
    s = train.sorted_by_user()
    offsets = s.user_offsets()
    present = train.present_users()
    calls = []
    for u in rng.choice(present, size=requests + warmup):
      lo, hi = offsets[u], offsets[u + 1]
      calls.append(dict(
          history_item_id=tf.constant(_to_bytes(item_index.raw_ids[s.items[lo:hi]]), tf.string),
          history_rating=tf.constant(s.ratings[lo:hi], tf.float32), k=tf.constant(k, tf.int32)))
  else:
    fn = serving.load_signature(version_dir, serving.RECOMMEND)
    users = rng.integers(0, len(user_index), size=requests + warmup)
    calls = [dict(user_id=tf.constant(_to_bytes(user_index.raw_ids[[u]]), tf.string),
                  k=tf.constant(k, tf.int32)) for u in users]
  times = []
  for n, kwargs in enumerate(calls):
    start = time.perf_counter()
    out = fn(**kwargs)
    _ = out['scores'].numpy()
    if n >= warmup:
      times.append((time.perf_counter() - start) * 1e3)
  return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _fmt(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def to_csv(rows: Sequence[ReportRow]) -> str:
  flat = [r.flat() for r in rows]
  keys = []
  for row in flat:
    keys.extend(k for k in row if k not in keys)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys)
  writer.writeheader()
  for row in flat:
    writer.writerow({k: row.get(k) for k in keys})
  return buf.getvalue()


def to_markdown(rows: Sequence[ReportRow], title: str = 'Compression report',
                extra: Optional[Mapping[str, object]] = None) -> str:
  """A Markdown table of the rows, plus ratios against the first row."""
  flat = [r.flat() for r in rows]
  keys = [k for k in flat[0] if k not in ('path',)] if flat else []
  for row in flat[1:]:
    keys.extend(k for k in row if k not in keys and k != 'path')
  lines = [f'# {title}', '', '| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  for row in flat:
    lines.append('| ' + ' | '.join(_fmt(row.get(k)).replace('|', '\\|') for k in keys) + ' |')
  if len(rows) > 1:
    base = rows[0]
    lines += ['', f'Relative to `{base.artifact}`:', '']
    for r in rows[1:]:
      parts = [f'raw {base.raw_bytes / r.raw_bytes:.2f}x smaller',
               f'gzip {base.gzip_bytes / r.gzip_bytes:.2f}x smaller']
      for m in ('rmse', 'mae'):
        if m in r.metrics and m in base.metrics:
          parts.append(f'{m} {r.metrics[m] - base.metrics[m]:+.4f}')
      lines.append(f'- `{r.artifact}`: ' + ', '.join(parts))
  if extra:
    lines += ['']
    lines += [f'- {k}: {v}' for k, v in extra.items()]
  return '\n'.join(lines) + '\n'


def write_report(rows: Sequence[ReportRow], directory: str, name: str = 'compression_report',
                 extra: Optional[Mapping[str, object]] = None) -> tuple[str, str]:
  """Writes `<name>.csv` and `<name>.md` in `directory` atomically; returns their paths."""
  if not rows:
    raise ValueError('no report rows')
  csv_path = os.path.join(directory, f'{name}.csv')
  md_path = os.path.join(directory, f'{name}.md')
  atomic.write(csv_path, to_csv(rows))
  atomic.write(md_path, to_markdown(rows, extra=extra))
  return csv_path, md_path
