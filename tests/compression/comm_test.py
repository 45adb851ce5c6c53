"""Compressed aggregation: byte counts, one real TFF round, and the DP combinations."""

import sys
import functools
import math

import numpy as np
import pytest
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from compression import comm
from privacy import dp_aggregators
from tff_rec.data import federated
from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import model_fns


def _spec(num_users, num_items, dim):
  return model_fns.ModelSpec(
      builder=functools.partial(registry.build_model, 'mf', embedding_dim=dim, global_mean=3.0),
      num_users=num_users, num_items=num_items, task='rating')


def _quantized_bytes(n):
  """8-bit codes packed 28 bits per int32 word, plus float32 min and max."""
  return 4 * math.ceil(8 * n / 28) + 8


def test_quantize8_upload_matches_hand_count():
  # MF 3 users x 4 items, dim 2: tables [3,2], [4,2], biases [3,1], [4,1], mean [].
  spec = _spec(3, 4, 2)
  agg = comm.build_compression_aggregator('quantize8', weighted=True, threshold=4,
                                          zeroing=False, clipping=False)
  stats = comm.aggregator_comm_stats(agg, spec, 'table', weighted=True)
  # > 4 elements are quantized: the two factor tables; the rest float32.
  update = _quantized_bytes(6) + _quantized_bytes(8) + 4 * (3 + 4 + 1)
  assert update == 16 + 20 + 32
  assert stats.upload_bytes == update + 4  # plus the float32 client weight
  assert stats.download_bytes == 4 * (6 + 8 + 3 + 4 + 1)  # float32 global model
  assert stats.update_float32_bytes == 88
  assert stats.upload_compression == pytest.approx(88 / 72)


def test_default_compression_aggregator_quantizes_tables_above_20000():
  spec = _spec(3, 2500, 10)  # item table 25000 elements > 20000
  agg = comm.build_compression_aggregator('quantize8', weighted=True)
  stats = comm.aggregator_comm_stats(agg, spec, 'table', weighted=True)
  aggregate = dict(stats.calls)['federated_aggregate']
  assert aggregate == _quantized_bytes(25000) + 4 * (30 + 3 + 2500 + 1)
  # Plus the weight, two adaptive norm estimates (2 float32 each) and the
  # zeroed / clipped counts.
  assert stats.upload_bytes == aggregate + 4 + 2 * 8 + 2 * 4
  assert stats.upload_compression > 2.5  # the 2500 item biases stay float32


def test_hadamard8_pads_each_tensor_to_a_power_of_two():
  spec = _spec(3, 4, 2)
  agg = comm.build_compression_aggregator('hadamard8', weighted=True, threshold=4,
                                          zeroing=False, clipping=False)
  stats = comm.aggregator_comm_stats(agg, spec, 'table', weighted=True)
  # 6 -> 8 and 8 -> 8 elements quantized; 3 -> 4, 4 and 1 elements float32.
  assert dict(stats.calls)['federated_aggregate'] == 2 * _quantized_bytes(8) + 4 * (4 + 4 + 1)
  # The rotation seed (int64[2]) is broadcast with the model.
  assert stats.download_bytes == 88 + 16


def test_comm_metrics_fn_scales_by_clients():
  stats = comm.CommStats(upload_bytes=100, download_bytes=400, update_float32_bytes=300)
  metrics = comm.comm_metrics_fn(stats, 5)(3)
  assert metrics['comm/bytes_per_client_upload'] == 100
  assert metrics['comm/bytes_client_to_server'] == 500
  assert metrics['comm/bytes_server_to_client'] == 2000
  assert metrics['comm/upload_compression'] == 3.0
  varying = comm.comm_metrics_fn(stats, lambda r: r + 1)
  assert varying(9)['comm/bytes_client_to_server'] == 1000
  merged = comm.combine_metrics_fns(None, comm.comm_metrics_fn(stats, 5), lambda r: {'dp/epsilon': 1.0})
  assert set(merged(0)) >= {'dp/epsilon', 'comm/bytes_per_client_upload'}
  assert comm.combine_metrics_fns(None) is None


@pytest.fixture(scope='module')
def client_data():
  r = synthetic.synthetic_ratings(num_users=20, num_items=10, rank=2, mean_ratings_per_user=5,
                                  seed=1).ratings
  split = splits.split_random(r, fractions=(0.9, 0.0, 0.1), seed=0)
  return federated.client_data(split.train, federated.ClientDatasetConfig(batch_size=8, num_epochs=1))


@pytest.mark.parametrize('mode,weighting,dp', [
    ('quantize8', 'num_examples', False),
    ('hadamard8', 'uniform', True),
])
def test_one_federated_round_with_compression(tff_context, client_data, mode, weighting, dp):
  spec = _spec(20, 10, 4)
  query = tfp.NormalizedQuery(tfp.GaussianSumQuery(1.0, 0.01), 3.0) if dp else None
  agg = comm.build_compression_aggregator(mode, weighted=weighting == 'num_examples', threshold=10,
                                          dp_query=query)
  process = algorithms.build_process(algorithms.AlgorithmConfig('fedavg', weighting=weighting),
                                     spec, model_fns.UserEmbedding.TABLE, agg)
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      client_data.dataset_computation, process)
  out = composed.next(composed.initialize(), ['0:0', '1:0', '2:0'])
  assert np.isfinite(out.metrics['client_work']['train']['loss'])
  stats = comm.process_comm_stats(process)
  plain = comm.process_comm_stats(algorithms.build_process(
      algorithms.AlgorithmConfig('fedavg', weighting=weighting, row_sparse_mean=False),
      spec, model_fns.UserEmbedding.TABLE))
  assert stats.upload_bytes < plain.upload_bytes
  assert stats.download_bytes >= plain.download_bytes


def _run_aggregator(agg, value):
  process = agg.create(tff.types.StructWithPythonType([tff.TensorType(np.float32, value.shape)], list))
  return np.asarray(process.next(process.initialize(), [[value]]).result[0])


def test_dp_quantize_then_clip_keeps_the_clip(tff_context):
  x = np.random.default_rng(0).normal(size=100).astype(np.float32) * 10  # norm ~100
  query = tfp.NormalizedQuery(tfp.GaussianSumQuery(l2_norm_clip=1.0, stddev=0.0), denominator=1.0)
  agg = comm.build_compression_aggregator('quantize8', weighted=False, threshold=10, zeroing=False,
                                          dp_query=query)
  v = _run_aggregator(agg, x)
  assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)  # exactly the clipped record
  codes = (v - v.min()) / (v.max() - v.min()) * 255
  assert np.max(np.abs(codes - np.round(codes))) < 1e-3  # still on the 8-bit grid
  rotated = comm.build_compression_aggregator('hadamard8', weighted=False, threshold=10,
                                              zeroing=False, dp_query=query)
  assert np.linalg.norm(_run_aggregator(rotated, x)) <= 1.0 + 1e-4
  post = comm.build_compression_aggregator('quantize8', weighted=False, threshold=10,
                                           dp_order='noise_then_quantize',
                                           dp_factory=tff.aggregators.DifferentiallyPrivateFactory(query))
  v = _run_aggregator(post, x)
  codes = (v - v.min()) / (v.max() - v.min()) * 255
  assert np.max(np.abs(codes - np.round(codes))) < 1e-3


def test_unsound_dp_combinations_are_refused():
  fixed = dp_aggregators.build_aggregator(
      dp_aggregators.DpConfig(mode='gaussian_fixed', noise_multiplier=1.0, clip=1.0), 10)
  ddp = dp_aggregators.build_aggregator(dp_aggregators.DpConfig(mode='ddp', noise_multiplier=0.5), 100)
  query = tfp.NormalizedQuery(tfp.GaussianSumQuery(1.0, 1.0), 10.0)
  with pytest.raises(ValueError, match='sensitivity'):
    comm.build_compression_aggregator('quantize8', weighted=False, dp_query=query,
                                      dp_order='clip_then_quantize')
  with pytest.raises(ValueError, match='pass dp_query'):
    comm.build_compression_aggregator('quantize8', weighted=False, dp_factory=fixed)
  with pytest.raises(ValueError, match='distributed DP'):
    comm.build_compression_aggregator('hadamard8', weighted=False, dp_factory=ddp)
  with pytest.raises(ValueError, match='unweighted'):
    comm.build_compression_aggregator('quantize8', weighted=True, dp_query=query)
  with pytest.raises(ValueError, match='either dp_factory or dp_query'):
    comm.build_compression_aggregator('quantize8', weighted=False, dp_query=query, dp_factory=fixed)
  with pytest.raises(ValueError, match='compression mode'):
    comm.build_compression_aggregator('zip', weighted=True)
  # Allowed: DP without compression, and post-processing of the private result.
  assert comm.build_compression_aggregator('none', weighted=False, dp_factory=ddp) is ddp
  assert comm.build_compression_aggregator('quantize8', weighted=False, dp_factory=fixed,
                                           dp_order='noise_then_quantize') is not None
  assert comm.build_compression_aggregator('none', weighted=True) is None


def test_default_aggregator_stats_count_row_sparse_denominators():
  spec = _spec(3, 4, 2)
  stats = comm.aggregator_comm_stats(None, spec, 'table', weighted=True)
  # Row-sparse mean: the weighted update (88 bytes) plus one float32 weight per
  # row of each table (3 + 4 + 3 + 4) and one for the global mean.
  assert stats.upload_bytes == 88 + 4 * (3 + 4 + 3 + 4 + 1)
  plain = comm.aggregator_comm_stats(None, spec, 'table', weighted=True, row_sparse_mean=False)
  assert plain.upload_bytes == 88 + 4


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
