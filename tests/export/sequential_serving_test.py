"""SASRec export: the `recommend` signature from recent item ids, reloaded in a fresh process."""

import sys
import os

import numpy as np
import pytest

from tff_rec.export import sequential_serving
from tff_rec.export import serving
from tff_rec.export import warmup
from tff_rec.models import registry

_ITEMS = [str(10 * i) for i in range(1, 31)]  # raw ids 10, 20, ..., 300 = model ids 1..30


@pytest.fixture(scope='module')
def model():
  return registry.build_sequential_model('sasrec', 30, maxlen=6, hidden_units=8, num_blocks=1,
                                         num_heads=1, dropout=0.0, seed=3)


def _expected(model, history_raw, k):
  ids = [_ITEMS.index(h) + 1 for h in history_raw if h]
  window = np.zeros((1, 6), np.int32)
  tail = ids[-6:]
  window[0, 6 - len(tail):] = tail
  scores = model.score_all(window).numpy()[0, 1:]
  scores[[i - 1 for i in ids]] = -np.inf
  order = np.argsort(-scores, kind='stable')[:k]
  return [_ITEMS[i] for i in order], scores[order]


def test_export_layout_signature_and_fresh_process(model, tmp_path):
  result = sequential_serving.export(model, _ITEMS, export_base=str(tmp_path), model_name='sasrec',
                                     version=1)
  version_dir = tmp_path / 'sasrec' / '1'
  assert result.version_dir == str(version_dir) and result.signatures == ('recommend',)
  assert (version_dir / 'saved_model.pb').exists()
  assert os.path.exists(warmup.warmup_path(str(version_dir)))
  assert 'base_path' in (tmp_path / 'models.config').read_text()
  shown = serving.cli_show(str(version_dir))
  assert "signature_def['recommend']" in shown and 'history_item_id' in shown
  # Padding anywhere, more items than the window: the last 6 known items are the input.
  histories = np.array([['', '10', '20', '', '30', '40', '50', '60', '70', ''],
                        ['300', '', '', '', '', '', '', '', '', '']], dtype=object)
  out = serving.predict_in_fresh_process(str(version_dir), 'recommend',
                                         {'history_item_id': histories, 'k': np.int32(5)})
  for row, history in enumerate(histories):
    want_ids, want_scores = _expected(model, list(history), 5)
    assert [x.decode() for x in out['item_ids'][row]] == want_ids
    np.testing.assert_allclose(out['scores'][row], want_scores, rtol=1e-5, atol=1e-5)
    assert not set(want_ids) & set(history)  # the history is never recommended
  # The warmup request runs against the export.
  [log] = warmup.read_warmup(warmup.warmup_path(str(version_dir)))
  fn = serving.load_signature(str(version_dir), 'recommend')
  assert fn(**{k: v for k, v in warmup.request_inputs(log).items()})['item_ids'].shape[0] == 2


def test_unknown_ids_and_large_k(model, tmp_path):
  sequential_serving.export(model, _ITEMS, export_base=str(tmp_path), model_name='strict', version=1)
  sequential_serving.export(model, _ITEMS, export_base=str(tmp_path), model_name='lenient',
                            version=1, unknown_item='skip')
  strict = serving.load_signature(str(tmp_path / 'strict' / '1'), 'recommend')
  lenient = serving.load_signature(str(tmp_path / 'lenient' / '1'), 'recommend')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  bad = tf.constant([['10', '999']])
  with pytest.raises(tf.errors.InvalidArgumentError, match='999'):
    strict(history_item_id=bad, k=tf.constant(3))
  skipped = lenient(history_item_id=bad, k=tf.constant(3))
  same = lenient(history_item_id=tf.constant([['10', '']]), k=tf.constant(3))
  np.testing.assert_array_equal(skipped['item_ids'].numpy(), same['item_ids'].numpy())
  # k above the unseen items: the tail is empty with -inf scores.
  out = lenient(history_item_id=tf.constant([_ITEMS[:28]]), k=tf.constant(40))
  ids = [x.decode() for x in out['item_ids'].numpy()[0]]
  assert sorted(ids[:2]) == ['290', '300'] and ids[2:] == [''] * 28
  assert np.isinf(out['scores'].numpy()[0, 2:]).all()


def test_bad_exports_leave_nothing(model, tmp_path):
  with pytest.raises(serving.ExportError, match='29 item ids'):
    sequential_serving.export(model, _ITEMS[:29], export_base=str(tmp_path), model_name='m', version=1)
  with pytest.raises(serving.ExportError, match='unknown_item'):
    sequential_serving.export(model, _ITEMS, export_base=str(tmp_path), model_name='m', version=1,
                              unknown_item='cold_start')
  with pytest.raises(serving.ExportError, match='version'):
    sequential_serving.export(model, _ITEMS, export_base=str(tmp_path), model_name='m', version=0)
  assert not os.listdir(tmp_path)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
