"""Raw id <-> index maps of the exported SavedModels."""

import sys
import os

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.export import id_maps


def _strings(t) -> list:
  return [s.decode() for s in np.asarray(t).ravel()]


def test_integer_runs():
  starts, offsets, lengths = id_maps.integer_runs(['5', '6', '7', '1', '2', '10'])
  np.testing.assert_array_equal(starts, [5, 1, 10])
  np.testing.assert_array_equal(offsets, [0, 3, 5])
  np.testing.assert_array_equal(lengths, [3, 2, 1])
  for ids in (['1', '02'], ['1', '-3'], ['a'], ['1', ''], ['1' * 20], []):
    assert id_maps.integer_runs(ids) is None, ids


def test_build_picks_the_smaller_store(tmp_path):
  dense = [str(i) for i in range(1, 2001)]
  assert id_maps.build(dense, str(tmp_path / 'a.txt')).kind == 'range'
  assert not os.path.exists(tmp_path / 'a.txt')
  scattered = [str(i) for i in range(0, 4000, 2)]  # one run per id: text is smaller
  assert id_maps.build(scattered, str(tmp_path / 'b.txt')).kind == 'text'
  assert id_maps.build(['u1', 'u2'], str(tmp_path / 'c.txt')).kind == 'text'
  with pytest.raises(id_maps.IdMapError, match='not unique'):
    id_maps.build(['a', 'b', 'a'], str(tmp_path / 'd.txt'))


@pytest.mark.parametrize('kind', ['range', 'text'])
def test_lookups_agree_with_the_id_list(tmp_path, kind):
  # Runs out of order (10-12 before 1-3), a gap, a singleton.
  raw = ['10', '11', '12', '1', '2', '3', '7', '20', '21']
  m = id_maps.RangeIdMap(raw) if kind == 'range' else id_maps.TextIdMap(raw, str(tmp_path / 'ids.txt'))
  np.testing.assert_array_equal(m.index_of(tf.constant(raw)).numpy(), np.arange(len(raw)))
  assert _strings(m.id_of(tf.constant([[8, 0], [3, 6]]))) == ['21', '10', '1', '7']
  unknown = ['0', '4', '9', '13', '22', '-1', '01', 'x', '', '99999999999999999999']
  np.testing.assert_array_equal(m.index_of(tf.constant(unknown)).numpy(), -1)
  assert _strings(m.id_of(tf.constant([-1, 9, 100, 2]))) == ['', '', '', '12']


def test_range_map_refuses_non_integer_or_repeated_ids():
  with pytest.raises(id_maps.IdMapError, match='integer'):
    id_maps.RangeIdMap(['1', 'b'])
  with pytest.raises(id_maps.IdMapError, match='unique'):
    id_maps.RangeIdMap(['1', '2', '1'])


def test_text_map_refuses_unstorable_ids(tmp_path):
  with pytest.raises(id_maps.IdMapError, match='one per line'):
    id_maps.TextIdMap(['a', 'b\nc'], str(tmp_path / 'ids.txt'))


@pytest.mark.parametrize('raw', [[str(i) for i in range(100, 400)], ['u%d' % i for i in range(300)]])
def test_saved_model_round_trip(tmp_path, raw):
  module = tf.Module()
  module.ids = id_maps.build(raw, str(tmp_path / 'ids.txt'))
  module.index_of = tf.function(module.ids.index_of, input_signature=[tf.TensorSpec([None], tf.string)])
  module.id_of = tf.function(module.ids.id_of, input_signature=[tf.TensorSpec([None], tf.int32)])
  tf.saved_model.save(module, str(tmp_path / 'model'))
  assert os.path.exists(tmp_path / 'ids.txt') == (module.ids.kind == 'text')
  if module.ids.kind == 'text':
    os.remove(tmp_path / 'ids.txt')  # the loaded map must read its copy under assets/
  has_assets = bool(os.listdir(tmp_path / 'model' / 'assets'))
  assert has_assets == (module.ids.kind == 'text')
  loaded = tf.saved_model.load(str(tmp_path / 'model'))
  np.testing.assert_array_equal(loaded.index_of(tf.constant(raw[::7] + ['nope'])).numpy(),
                                list(range(0, len(raw), 7)) + [-1])
  assert _strings(loaded.id_of(tf.constant([0, 299, 5], tf.int32))) == [raw[0], raw[299], raw[5]]


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
