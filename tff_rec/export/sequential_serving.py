"""TF Serving export of a sequential recommender (SASRec): recommend from a user's recent items.

No user id is needed: the request carries the user's recent items.

* `recommend(history_item_id: string[B, L], k: int32[])` ->
  `item_ids: string[B, k]`, `scores: float32[B, k]` (best first).
  Each row is one user's recent items, oldest first; empty strings are
  padding and may sit anywhere. The last `maxlen` known items form the
  model's input window. Items in the row are never recommended (they score
  -inf; when k exceeds the other items, the tail has -inf and empty ids).
  Unknown ids: 'error' fails the request naming them (InvalidArgument in TF
  Serving); 'skip' leaves them out of the window.

The layout, atomic save, `models.config` and warmup requests are those of
`tff_rec.export.serving` (`save_module`); raw item ids are mapped in the
graph by `tff_rec.export.id_maps`. Verify with `serving.cli_show` and
`serving.predict_in_fresh_process`, as for the other exports.
"""

from __future__ import annotations

import tempfile
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_rec.export import id_maps
from tff_rec.export import serving
from tff_rec.export import warmup
from tff_rec.models import sasrec

RECOMMEND = 'recommend'
UNKNOWN_POLICIES = ('error', 'skip')


class _SequentialServing(tf.Module):
  """The exported module: the model, the item id map and the `recommend` function."""

  def __init__(self, model: sasrec.SASRec, item_ids: Sequence[str], unknown_item: str,
               id_dir: str):
    super().__init__(name='sequential_serving')
    self.model = model
    self.items = id_maps.build(list(item_ids), f'{id_dir}/item_ids.txt')
    self._unknown = unknown_item
    self._maxlen = int(model.maxlen)
    self._num_items = int(model.num_items)

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name='history_item_id'),
                                tf.TensorSpec([], tf.int32, name='k')])
  def recommend(self, history_item_id, k):
    index = self.items.index_of(history_item_id)  # -1: unknown or padding
    unknown = tf.logical_and(index < 0, tf.not_equal(history_item_id, ''))
    checks = []
    if self._unknown == 'error':
      checks.append(tf.debugging.Assert(
          tf.logical_not(tf.reduce_any(unknown)),
          ['unknown history_item_id:', tf.boolean_mask(history_item_id, unknown)], summarize=20))
    with tf.control_dependencies(checks):
      ids = tf.cast(tf.where(index >= 0, index + 1, 0), tf.int32)  # model ids 1..N, 0 pads
    length = tf.shape(ids)[1]
    # Known items to the right, in their order: the window is the last maxlen of them.
    key = tf.cast(ids > 0, tf.int32) * length + tf.range(length)[None]
    ids = tf.gather(ids, tf.argsort(key, axis=1, stable=True), batch_dims=1)
    ids = tf.concat([tf.zeros([tf.shape(ids)[0], self._maxlen], tf.int32), ids], axis=1)
    window = ids[:, -self._maxlen:]
    scores = self.model.score_all(window)[:, 1:]  # [B, N]: item index i is model id i + 1
    seen = tf.reduce_any(tf.one_hot(ids - 1, self._num_items, on_value=True, off_value=False,
                                    dtype=tf.bool), axis=1)
    scores = tf.where(seen, tf.constant(-np.inf, tf.float32), scores)
    check = tf.debugging.Assert(k > 0, ['k must be positive, got', k])
    with tf.control_dependencies([check]):
      top = tf.math.top_k(scores, tf.minimum(k, self._num_items))
    item_ids = self.items.id_of(top.indices)
    item_ids = tf.where(tf.math.is_inf(top.values), tf.constant('', tf.string), item_ids)
    return {'item_ids': item_ids, 'scores': top.values}

  def signatures(self) -> dict:
    return {RECOMMEND: self.recommend.get_concrete_function()}


def warmup_requests(model_name: str, item_ids: Sequence[str], *, k: int = 10) -> list:
  """One `recommend` request with known items (and a padded row)."""
  history = np.array([[str(i).encode() for i in list(item_ids)[:3]],
                      [b'', str(item_ids[0]).encode(), b'']], dtype=object)
  return [warmup.predict_log(model_name, RECOMMEND, {
      'history_item_id': history, 'k': np.int32(min(k, len(item_ids)))})]


def export(model: sasrec.SASRec, item_ids: Sequence[str], *, export_base: str, model_name: str,
           version: int, unknown_item: str = 'error', warmup_k: int = 10,
           overwrite: bool = False) -> serving.ExportResult:
  """Exports a trained sequential model for TF Serving.

  Args:
    model: The trained model (items 1..N are `item_ids[0..N-1]`).
    item_ids: Raw item ids in model order (`SequenceSplit.item_index.raw_ids`).
    export_base: Folder of `models.config`.
    model_name: TF Serving model name.
    version: Positive version number.
    unknown_item: 'error' or 'skip' for history ids outside the catalog.
    warmup_k: k of the warmup request.
    overwrite: Replace an existing version.

  Returns:
    The `serving.ExportResult`.

  Raises:
    ExportError: Bad name, version, policy or catalog, or non-finite weights.
  """
  if unknown_item not in UNKNOWN_POLICIES:
    raise serving.ExportError(f'unknown_item must be one of {UNKNOWN_POLICIES}, got {unknown_item!r}')
  if len(item_ids) != model.num_items:
    raise serving.ExportError(f'{len(item_ids)} item ids for a model of {model.num_items} items')
  serving.check_finite(model)
  final = serving.check_version(export_base, model_name, version, overwrite)
  with tempfile.TemporaryDirectory(prefix='tff_rec_ids_') as id_dir:
    try:
      module = _SequentialServing(model, [str(i) for i in item_ids], unknown_item, id_dir)
    except id_maps.IdMapError as e:
      raise serving.ExportError(str(e)) from e
    return serving.save_module(module, export_base=export_base, model_name=model_name,
                               version=version, final=final,
                               warmup_logs=warmup_requests(model_name, item_ids, k=warmup_k),
                               overwrite=overwrite)
