"""RowSparseMeanFactory averages each table row over the clients touching it."""

import sys
import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_rec.training import aggregators


def _value_type():
  return tff.StructWithPythonType(
      [('table', tff.TensorType(np.float32, [4, 2])), ('dense', tff.TensorType(np.float32, [3]))],
      collections.OrderedDict)


def _client(rows: dict, dense):
  table = np.zeros([4, 2], np.float32)
  for r, v in rows.items():
    table[r] = v
  return collections.OrderedDict(table=table, dense=np.asarray(dense, np.float32))


CLIENTS = [
    _client({0: [1.0, 1.0], 1: [2.0, 0.0]}, [1.0, 1.0, 1.0]),
    _client({1: [4.0, 2.0]}, [3.0, 3.0, 3.0]),
    _client({3: [0.0, -6.0]}, [5.0, 5.0, 5.0]),
]


def test_weighted_row_sparse_mean(tff_context):
  del tff_context
  factory = aggregators.RowSparseMeanFactory([False, True])  # tf.nest order: dense, table
  process = factory.create(_value_type(), tff.TensorType(np.float32))
  weights = [1.0, 3.0, 2.0]
  out = process.next(process.initialize(), CLIENTS, weights)
  table = out.result['table']
  # Row 0: only client 0 touched it -> its value unchanged.
  np.testing.assert_allclose(table[0], [1.0, 1.0])
  # Row 1: clients 0 (w=1) and 1 (w=3).
  np.testing.assert_allclose(table[1], (np.array([2.0, 0.0]) + 3 * np.array([4.0, 2.0])) / 4)
  # Row 2: untouched -> zero update (no division by zero).
  np.testing.assert_allclose(table[2], [0.0, 0.0])
  np.testing.assert_allclose(table[3], [0.0, -6.0])
  # Dense tensors: plain weighted mean.
  np.testing.assert_allclose(out.result['dense'], np.full(3, (1 + 9 + 10) / 6))


def test_unweighted_row_sparse_mean(tff_context):
  del tff_context
  # tf.nest order: dense, table.
  process = aggregators.UnweightedRowSparseMeanFactory([False, True]).create(_value_type())
  out = process.next(process.initialize(), CLIENTS)
  np.testing.assert_allclose(out.result['table'][1], [3.0, 1.0])
  np.testing.assert_allclose(out.result['dense'], np.full(3, 3.0))


def test_plain_mean_would_dilute_user_rows(tff_context):
  """The reason for the factory: MeanFactory divides row 0 by all clients."""
  del tff_context
  process = tff.aggregators.UnweightedMeanFactory().create(_value_type())
  out = process.next(process.initialize(), CLIENTS)
  np.testing.assert_allclose(out.result['table'][0], [1 / 3, 1 / 3])


def test_mask_length_is_checked():
  with pytest.raises(ValueError, match='sparse_leaves has 1'):
    aggregators.UnweightedRowSparseMeanFactory([True]).create(_value_type())


def test_sparse_leaf_mask_by_layer_name():
  names = ['user_embedding/embeddings:0', 'dense/kernel:0', 'item_bias/embeddings:0']
  assert aggregators.sparse_leaf_mask(names, ['user_embedding', 'item_bias']) == [True, False, True]


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
