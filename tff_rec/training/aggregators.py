"""Row-sparse weighted mean for embedding tables in FedAvg.

With one client per user, a client's update to an embedding table touches only
the rows of its own user and of the items it rated. A plain mean divides
every row's update by the total weight of all clients, so each user row moves
by 1/clients of its own update. `RowSparseMeanFactory` divides each row by the
summed weight of the clients whose update touched that row (and non-table
tensors by the total weight, like `tff.aggregators.MeanFactory`).

This reveals which rows each client touched, which a plain mean would not; it
is refused together with differential privacy (see `privacy/`).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def _touched_rows(t: tf.Tensor) -> tf.Tensor:
  """1.0 for each row with any nonzero entry, else 0.0."""
  axes = list(range(1, t.shape.rank))
  nonzero = tf.not_equal(t, 0)
  if axes:
    nonzero = tf.reduce_any(nonzero, axis=axes)
  return tf.cast(nonzero, t.dtype)


class _RowSparseMean:
  """Mean whose embedding-table rows are averaged over the clients touching them.

  `sparse_leaves[k]` says whether leaf k (in `tf.nest.flatten` order of the
  value; dict keys sorted) is an embedding table.
  """

  def __init__(
      self,
      sparse_leaves: Sequence[bool],
      value_sum_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  ):
    self._sparse = tuple(bool(s) for s in sparse_leaves)
    self._value_sum_factory = value_sum_factory or tff.aggregators.SumFactory()

  def _create(self, value_type, weight_type=None) -> tff.templates.AggregationProcess:
    leaf_types = tff.types.structure_from_tensor_type_tree(lambda t: t, value_type)
    flat_types = tf.nest.flatten(leaf_types)
    if len(flat_types) != len(self._sparse):
      raise ValueError(
          f'RowSparseMeanFactory: value has {len(flat_types)} tensors but '
          f'sparse_leaves has {len(self._sparse)} entries'
      )
    for t, sparse in zip(flat_types, self._sparse):
      if sparse and len(t.shape) < 1:
        raise ValueError(f'RowSparseMeanFactory: sparse leaf must have rank >= 1, got {t}')
    weighted = weight_type is not None
    sparse = self._sparse
    dtype_of = [t.dtype for t in flat_types]

    def prepare(value, weight):
      flat = tf.nest.flatten(value)
      scaled, denominators = [], []
      for t, is_sparse in zip(flat, sparse):
        w = tf.cast(weight, t.dtype)
        scaled.append(t * w)
        denominators.append(_touched_rows(t) * w if is_sparse else w)
      return tf.nest.pack_sequence_as(value, scaled), denominators

    if weighted:
      prepare_comp = tff.tensorflow.computation(prepare, value_type, weight_type)
    else:
      prepare_comp = tff.tensorflow.computation(
          lambda value: prepare(value, tf.constant(1.0)), value_type
      )

    weights_type = prepare_comp.type_signature.result[1]
    value_sum = self._value_sum_factory.create(value_type)
    weight_sum = tff.aggregators.SumFactory().create(weights_type)

    @tff.tensorflow.computation(value_type, weights_type)
    def divide(total, denominators):
      flat = tf.nest.flatten(total)
      out = []
      for t, d, is_sparse in zip(flat, denominators, sparse):
        if is_sparse:
          d = tf.reshape(d, [-1] + [1] * (t.shape.rank - 1))
        out.append(tf.math.divide_no_nan(t, d))
      return tf.nest.pack_sequence_as(total, out)

    @tff.federated_computation()
    def init_fn():
      return tff.federated_zip(
          collections.OrderedDict(
              value_sum=value_sum.initialize(), weight_sum=weight_sum.initialize()
          )
      )

    def next_body(state, value, weight):
      if weighted:
        prepared = tff.federated_map(prepare_comp, (value, weight))
      else:
        prepared = tff.federated_map(prepare_comp, value)
      v_out = value_sum.next(state['value_sum'], prepared[0])
      w_out = weight_sum.next(state['weight_sum'], prepared[1])
      mean = tff.federated_map(divide, (v_out.result, w_out.result))
      new_state = tff.federated_zip(
          collections.OrderedDict(value_sum=v_out.state, weight_sum=w_out.state)
      )
      measurements = tff.federated_zip(
          collections.OrderedDict(mean_value=v_out.measurements, mean_weight=w_out.measurements)
      )
      return tff.templates.MeasuredProcessOutput(new_state, mean, measurements)

    state_type = init_fn.type_signature.result
    if weighted:
      next_fn = tff.federated_computation(
          next_body,
          state_type,
          tff.FederatedType(value_type, tff.CLIENTS),
          tff.FederatedType(weight_type, tff.CLIENTS),
      )
    else:
      next_fn = tff.federated_computation(
          lambda state, value: next_body(state, value, None),
          state_type,
          tff.FederatedType(value_type, tff.CLIENTS),
      )
    return tff.templates.AggregationProcess(init_fn, next_fn)


class RowSparseMeanFactory(_RowSparseMean, tff.aggregators.WeightedAggregationFactory):
  """Weighted row-sparse mean: `create(value_type, weight_type)`."""

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    return self._create(value_type, weight_type)


class UnweightedRowSparseMeanFactory(_RowSparseMean, tff.aggregators.UnweightedAggregationFactory):
  """Unweighted row-sparse mean (every client weight 1): `create(value_type)`."""

  def create(self, value_type) -> tff.templates.AggregationProcess:
    return self._create(value_type)


def row_sparse_mean(sparse_leaves: Sequence[bool], weighted: bool):
  """The weighted or unweighted row-sparse mean factory."""
  cls = RowSparseMeanFactory if weighted else UnweightedRowSparseMeanFactory
  return cls(sparse_leaves)


def sparse_leaf_mask(trainable_variable_names: Sequence[str], table_names: Sequence[str]) -> list[bool]:
  """Which trainable variables (by name) belong to the named embedding layers."""
  tables = tuple(table_names)
  return [any(n.split('/')[0] == t for t in tables) for n in trainable_variable_names]


# Measurement keys added by `count_zeroed_updates`.
ZEROED_KEY = 'client_updates_zeroed'
CLIENTS_KEY = 'client_updates'


class _ZeroedUpdateCount:
  """Adds to an aggregator's measurements how many client updates were all zero.

  TFF's client work replaces a non-finite update by zeros (and, weighted, a
  zero weight), silently. Counting all-zero updates server-side (a plain sum
  of 0/1 per client, like TFF's training metrics: not covered by DP) lets the
  training loop stop a run in which too many clients diverged
  (`loop.LoopConfig.max_zeroed_share`). State and result are the inner
  aggregator's, unchanged.
  """

  def __init__(self, inner):
    self._inner = inner

  def _create(self, value_type, weight_type=None) -> tff.templates.AggregationProcess:
    weighted = weight_type is not None
    inner = (self._inner.create(value_type, weight_type) if weighted
             else self._inner.create(value_type))

    @tff.tensorflow.computation(value_type)
    def all_zero(value):
      flat = tf.nest.flatten(value)
      zero = tf.reduce_all([tf.reduce_all(tf.equal(t, 0)) for t in flat]) if flat else True
      return tf.cast(zero, tf.int32)

    @tff.tensorflow.computation
    def one():
      return tf.constant(1, tf.int32)

    state_type = inner.initialize.type_signature.result
    measurements_type = inner.next.type_signature.result.measurements.member

    def next_body(state, value, weight):
      out = inner.next(state, value, weight) if weighted else inner.next(state, value)
      counts = collections.OrderedDict([
          (ZEROED_KEY, tff.federated_sum(tff.federated_map(all_zero, value))),
          (CLIENTS_KEY, tff.federated_sum(tff.federated_eval(one, tff.CLIENTS))),
      ])
      names = [n for n, _ in tff.structure.iter_elements(measurements_type)
               ] if isinstance(measurements_type, tff.StructType) else []
      if names and all(names):
        merged = collections.OrderedDict((n, out.measurements[n]) for n in names)
        merged.update(counts)
      else:
        merged = collections.OrderedDict(inner=out.measurements, **counts)
      return tff.templates.MeasuredProcessOutput(out.state, out.result, tff.federated_zip(merged))

    if weighted:
      next_fn = tff.federated_computation(
          next_body, state_type, tff.FederatedType(value_type, tff.CLIENTS),
          tff.FederatedType(weight_type, tff.CLIENTS))
    else:
      next_fn = tff.federated_computation(
          lambda state, value: next_body(state, value, None), state_type,
          tff.FederatedType(value_type, tff.CLIENTS))
    return tff.templates.AggregationProcess(inner.initialize, next_fn)


class _WeightedZeroedCount(_ZeroedUpdateCount, tff.aggregators.WeightedAggregationFactory):

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    return self._create(value_type, weight_type)


class _UnweightedZeroedCount(_ZeroedUpdateCount, tff.aggregators.UnweightedAggregationFactory):

  def create(self, value_type) -> tff.templates.AggregationProcess:
    return self._create(value_type)


def count_zeroed_updates(inner):
  """`inner` (a weighted or unweighted factory) plus counts of all-zero client updates."""
  if isinstance(inner, tff.aggregators.WeightedAggregationFactory):
    return _WeightedZeroedCount(inner)
  if isinstance(inner, tff.aggregators.UnweightedAggregationFactory):
    return _UnweightedZeroedCount(inner)
  raise TypeError(f'not a TFF aggregation factory: {inner!r}')
