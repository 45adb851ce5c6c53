"""A test aggregator that records what it is asked to aggregate."""

import tensorflow_federated as tff


class RecordingMean(tff.aggregators.UnweightedAggregationFactory):
  """TFF's unweighted mean, recording the type it is asked to aggregate."""

  def __init__(self):
    self.value_types = []
    self._inner = tff.aggregators.UnweightedMeanFactory()

  def create(self, value_type):
    self.value_types.append(value_type)
    return self._inner.create(value_type)
