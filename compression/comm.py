"""Compressed client-to-server communication in federated training.

`build_compression_aggregator(mode, weighted=...)` returns a model-update
aggregation factory for `run_federated(model_aggregator=...)`:

* 'none': no compression (`None`, i.e. the algorithm's default mean; with
  DP, the DP factory unchanged).
* 'quantize8': `tff.learning.compression_aggregator` (adaptive zeroing and
  L2 clipping around a weighted/unweighted mean whose sum is
  `EncodedSumFactory.quantize_above_threshold`): every tensor with more than
  `threshold` elements is uniformly quantized to 8 bits between its own min
  and max (stochastic rounding) and bit-packed; smaller tensors go in float32.
* 'hadamard8': the same, with a randomized Hadamard rotation
  (`HadamardTransformFactory`; `rotation='dft'`:
  `DiscreteFourierTransformFactory`) between the mean and the quantized sum,
  which spreads outliers over all coordinates so the min/max grid is finer.

Differential privacy (the factories of `privacy/dp_aggregators.py`) combines
with compression only where the DP guarantee survives (see
`build_compression_aggregator`). Each refused combination raises ValueError
naming the reason.

`aggregator_comm_stats` / `process_comm_stats` count the bytes each client
uploads and downloads per round from the TFF types of the computation (the
encoded, bit-packed tensors, not an estimate), and `comm_metrics_fn` turns
them into per-round metrics for `run_federated(extra_metrics_fn=...)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import tree_analysis

MODES = ('none', 'quantize8', 'hadamard8')
ROTATIONS = ('hd', 'dft')
DP_ORDERS = ('quantize_then_clip', 'clip_then_quantize', 'noise_then_quantize')
# tff.learning.compression_aggregator quantizes tensors above this many elements.
DEFAULT_THRESHOLD = 20000
BITS = 8

_AGGREGATION_URIS = (
    'federated_aggregate', 'federated_sum', 'federated_mean', 'federated_weighted_mean',
    'federated_secure_sum', 'federated_secure_sum_bitwidth', 'federated_secure_modular_sum',
    'federated_min', 'federated_max',
)
_BROADCAST_URI = 'federated_broadcast'


# ---------------------------------------------------------------------------
# Factories.


def _zeroing(inner):
  """tff.learning's default adaptive zeroing (2x the 98th percentile norm + 1)."""
  norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
      initial_estimate=10.0, target_quantile=0.98, learning_rate=math.log(10.0),
      multiplier=2.0, increment=1.0)
  return tff.aggregators.zeroing_factory(norm, inner)


def _clipping(inner):
  """tff.learning's default adaptive L2 clipping (to the 80th percentile norm)."""
  norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
      initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2)
  return tff.aggregators.clipping_factory(norm, inner)


def _quantized_sum(threshold: int, stochastic: bool = True):
  """EncodedSum quantizing tensors with more than `threshold` elements to 8 bits."""
  return tff.aggregators.EncodedSumFactory.quantize_above_threshold(
      quantization_bits=BITS, threshold=threshold, stochastic=stochastic)


def _rotation(rotation: str, inner):
  if rotation == 'hd':
    return tff.aggregators.HadamardTransformFactory(inner)
  return tff.aggregators.DiscreteFourierTransformFactory(inner)


def _qdq(x: tf.Tensor) -> tf.Tensor:
  """Quantize-dequantize to the 8-bit min/max grid with stochastic rounding.

  The same grid as the uniform-quantization encoder of `EncodedSumFactory`:
  `min + round((x - min) / (max - min) * 255) * (max - min) / 255`.
  """
  lo, hi = tf.reduce_min(x), tf.reduce_max(x)
  levels = float(2 ** BITS - 1)
  scaled = tf.math.divide_no_nan(x - lo, hi - lo) * levels
  floor = tf.floor(scaled)
  up = tf.cast(tf.random.uniform(tf.shape(x), dtype=x.dtype) < scaled - floor, x.dtype)
  return (floor + up) / levels * (hi - lo) + lo


class _ClientQuantizeFactory(tff.aggregators.UnweightedAggregationFactory):
  """Quantize-dequantizes large client tensors to the 8-bit grid, then `inner`.

  Used *before* a DP clip: the DP factory clips and sums the dequantized
  values (exactly re-encoded by a deterministic 8-bit `EncodedSumFactory`,
  see `build_compression_aggregator`).
  """

  def __init__(self, inner, threshold: int):
    self._inner = inner
    self._threshold = threshold

  def create(self, value_type):
    threshold = self._threshold

    @tff.tensorflow.computation(value_type)
    def quantize(value):
      return tf.nest.map_structure(
          lambda t: _qdq(t) if t.shape.num_elements() > threshold else t, value)

    inner = self._inner.create(value_type)

    @tff.federated_computation(
        inner.initialize.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      return inner.next(state, tff.federated_map(quantize, value))

    return tff.templates.AggregationProcess(inner.initialize, next_fn)


class _ServerQuantizeFactory(tff.aggregators.UnweightedAggregationFactory):
  """`inner`, then 8-bit quantize-dequantize of its (already private) result."""

  def __init__(self, inner, threshold: int):
    self._inner = inner
    self._threshold = threshold

  def create(self, value_type):
    threshold = self._threshold
    inner = self._inner.create(value_type)
    result_type = inner.next.type_signature.result.result.member

    @tff.tensorflow.computation(result_type)
    def quantize(value):
      return tf.nest.map_structure(
          lambda t: _qdq(t) if t.shape.num_elements() > threshold else t, value)

    @tff.federated_computation(
        inner.initialize.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      out = inner.next(state, value)
      return tff.templates.MeasuredProcessOutput(
          out.state, tff.federated_map(quantize, out.result), out.measurements)

    return tff.templates.AggregationProcess(inner.initialize, next_fn)


def _is_distributed_dp(factory) -> bool:
  """Whether `factory` (or a factory it wraps) is TFF's distributed DP sum."""
  from tensorflow_federated.python.aggregators import distributed_dp  # pylint: disable=g-import-not-at-top

  seen, stack = set(), [factory]
  while stack:
    f = stack.pop()
    if id(f) in seen or f is None:
      continue
    seen.add(id(f))
    if isinstance(f, distributed_dp.DistributedDpSumFactory):
      return True
    stack.extend(v for v in vars(f).values()
                 if isinstance(v, (tff.aggregators.UnweightedAggregationFactory,
                                   tff.aggregators.WeightedAggregationFactory)))
  return False


def build_compression_aggregator(
    mode: str,
    *,
    weighted: bool,
    dp_factory=None,
    dp_query=None,
    dp_order: str = 'quantize_then_clip',
    threshold: int = DEFAULT_THRESHOLD,
    zeroing: bool = True,
    clipping: bool = True,
    rotation: str = 'hd',
):
  """The model-update aggregator of `mode`, optionally combined with DP.

  Args:
    mode: one of MODES.
    weighted: a weighted mean (FedAvg's `num_examples` weighting) or an
      unweighted one (`uniform`). DP aggregation is unweighted.
    dp_factory: a complete DP factory, e.g.
      `privacy.dp_aggregators.build_aggregator(config, clients_per_round)`.
    dp_query: the `tfp.DPQuery` (normalized sum query) of a central DP
      mechanism, e.g. `tfp.NormalizedQuery(tfp.GaussianSumQuery(clip,
      nm * clip), clients_per_round)`. Compression inside DP needs the
      query, because the quantized transport must sit inside its clip.
    dp_order: where quantization sits relative to DP (see below).
    threshold: tensors with more than this many elements are quantized.
    zeroing, clipping: TFF's adaptive zeroing / L2 clipping (non-DP only for
      clipping; with DP its own clip applies).
    rotation: 'hd' (Hadamard) or 'dft' for mode 'hadamard8'.

  DP combinations:
    * mode 'none': `dp_factory` (or a `DifferentiallyPrivateFactory` of
      `dp_query`) unchanged.
    * 'quantize_then_clip' with `dp_query` (central Gaussian / tree
      mechanisms): on each client the update is quantize-dequantized to its
      8-bit min/max grid (after the rotation for 'hadamard8'); the DP query
      clips that value (a scalar rescaling, so it stays on a scaled copy of
      the same grid with the extreme codes preserved) and the clipped record
      is sent with a deterministic 8-bit encoder, which reproduces those
      codes exactly. The summed records are therefore exactly the clipped
      records: L2 sensitivity stays the clip norm, the server adds the
      calibrated noise, and accounting is unchanged. The rotation is
      orthonormal and the Gaussian noise isotropic, so clipping and noising
      in the rotated space is the same mechanism. SOUND, and uploads shrink.
    * 'noise_then_quantize' (any DP): the noised aggregate is quantized on
      the server: post-processing of a private value, SOUND, but client
      uploads are not compressed (it models compressing the update the
      server sends back).
    * 'clip_then_quantize': REFUSED. Quantizing a clipped record moves each
      coordinate by up to one grid step, so its norm can exceed the clip by
      up to sqrt(d) * (max - min) / 255; the noise no longer covers the
      sensitivity.
    * 'quantize_then_clip' with a complete `dp_factory`: REFUSED. Its
      clipped records are summed in float32 inside the factory; compression
      would have to go after its clip (unsound, as above) or before it
      without shrinking the upload. Pass `dp_query` instead. Distributed DP
      (`ddp`) already discretizes inside its clip (conditional randomized
      rounding, accounted for) and sends `ddp_bits` per coordinate: use
      mode 'none' with it.
    * DP with `weighted=True`: REFUSED; data-dependent client weights
      change the sensitivity of the sum.

  Returns:
    An aggregation factory, or None for mode 'none' without DP (the
    algorithm's default aggregator).
  """
  if mode not in MODES:
    raise ValueError(f'compression mode must be one of {list(MODES)}, got {mode!r}')
  if dp_order not in DP_ORDERS:
    raise ValueError(f'dp_order must be one of {list(DP_ORDERS)}, got {dp_order!r}')
  if rotation not in ROTATIONS:
    raise ValueError(f'rotation must be one of {list(ROTATIONS)}, got {rotation!r}')
  if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
    raise ValueError(f'threshold must be a non-negative int, got {threshold!r}')
  if dp_factory is not None and dp_query is not None:
    raise ValueError('pass either dp_factory or dp_query, not both')
  dp = dp_factory is not None or dp_query is not None

  if not dp:
    if mode == 'none':
      return None
    if mode == 'quantize8' and threshold == DEFAULT_THRESHOLD:
      return tff.learning.compression_aggregator(
          zeroing=zeroing, clipping=clipping, weighted=weighted)
    inner = _quantized_sum(threshold)
    if mode == 'hadamard8':
      inner = _rotation(rotation, inner)
    agg = tff.aggregators.MeanFactory(inner) if weighted else tff.aggregators.UnweightedMeanFactory(inner)
    if clipping:
      agg = _clipping(agg)
    return _zeroing(agg) if zeroing else agg

  if weighted:
    raise ValueError(
        'DP aggregation is unweighted: data-dependent client weights would change the '
        'sensitivity of the sum; use weighted=False (--weighting=uniform)')
  if mode == 'none':
    agg = dp_factory if dp_factory is not None else tff.aggregators.DifferentiallyPrivateFactory(dp_query)
    return agg
  if dp_order == 'clip_then_quantize':
    raise ValueError(
        'compression after the DP clip is not sound: quantizing a clipped update moves each '
        'coordinate by up to one grid step, so its L2 norm can exceed the clip by up to '
        'sqrt(d) * (max - min) / 255 and the noise no longer covers the sensitivity; use '
        "dp_order='quantize_then_clip' (with dp_query) or 'noise_then_quantize'")
  if dp_order == 'noise_then_quantize':
    agg = dp_factory if dp_factory is not None else tff.aggregators.DifferentiallyPrivateFactory(dp_query)
    return _ServerQuantizeFactory(agg, threshold)
  # quantize_then_clip
  if dp_factory is not None:
    if _is_distributed_dp(dp_factory):
      raise ValueError(
          'distributed DP (ddp) already quantizes each update inside its clip (conditional '
          'randomized rounding to ddp_bits, accounted for in its sensitivity); extra 8-bit '
          "quantization after its client noise would change that noise; use mode='none'")
    raise ValueError(
        'a complete DP factory sums its clipped records in float32, so 8-bit quantization '
        'could only go after its clip (unsound: the quantized record may exceed the clip '
        'norm) or before it without shrinking the upload; pass dp_query= (the DPQuery) so '
        'the quantized transport is placed inside the clip')
  dp_agg = tff.aggregators.DifferentiallyPrivateFactory(
      dp_query, record_aggregation_factory=_quantized_sum(threshold, stochastic=False))
  agg = _ClientQuantizeFactory(dp_agg, threshold)
  if mode == 'hadamard8':
    agg = _rotation(rotation, agg)
  return _zeroing(agg) if zeroing else agg


# ---------------------------------------------------------------------------
# Bytes on the wire.


def type_bytes(type_spec, placement=None) -> int:
  """Bytes of the tensors in a TFF type (only those placed at `placement` if given).

  Function types (e.g. the zero/accumulate/merge functions of
  `federated_aggregate`) and unplaced values next to placed ones are not data
  that moves.
  """
  if isinstance(type_spec, tff.FederatedType):
    if placement is not None and type_spec.placement != placement:
      return 0
    return type_bytes(type_spec.member)
  if isinstance(type_spec, tff.StructType):
    return sum(type_bytes(t, placement) for t in type_spec)
  if isinstance(type_spec, tff.TensorType):
    if placement is not None:
      return 0
    shape = type_spec.shape
    if shape is None or any(d is None for d in shape):
      raise ValueError(f'cannot count the bytes of a tensor of unknown shape: {type_spec}')
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(type_spec.dtype).itemsize
  return 0


@dataclasses.dataclass(frozen=True)
class CommStats:
  """Per-client bytes of one round, from the computation's TFF types.

  Attributes:
    upload_bytes: what one client sends (every aggregation intrinsic's
      client-placed operand: encoded update, weight, estimator bits, and,
      for a whole process, metric sums).
    download_bytes: what one client receives (every `federated_broadcast`:
      the global model weights in float32 plus aggregator parameters).
    update_float32_bytes: the model update in float32 (for the ratio).
    calls: (intrinsic uri, bytes) per intrinsic call, for inspection.
  """

  upload_bytes: int
  download_bytes: int
  update_float32_bytes: int
  calls: tuple = ()

  @property
  def upload_compression(self) -> float:
    return self.update_float32_bytes / self.upload_bytes if self.upload_bytes else float('nan')


def _intrinsic_calls(bb) -> list:
  calls = []

  def visit(comp):
    if (isinstance(comp, building_blocks.Call) and isinstance(comp.function, building_blocks.Intrinsic)
        and comp.argument is not None):
      calls.append(comp)

  tree_analysis.visit_postorder(bb, visit)
  return calls


def computation_comm_bytes(comp) -> tuple[int, int, tuple]:
  """(upload, download, per-call details) per client of a federated computation."""
  up = down = 0
  details = []
  for call in _intrinsic_calls(comp.to_building_block()):
    uri = call.function.uri
    if uri in _AGGREGATION_URIS:
      n = type_bytes(call.argument.type_signature, tff.CLIENTS)
      up += n
      details.append((uri, n))
    elif uri == _BROADCAST_URI:
      n = type_bytes(call.argument.type_signature, tff.SERVER)
      down += n
      details.append((uri, n))
  return up, down, tuple(details)


def model_update_type(spec, user_embedding) -> tff.types.StructWithPythonType:
  """The TFF type of a model update: the trainable (global) weights, in order."""
  from tff_rec.training import model_fns  # pylint: disable=g-import-not-at-top

  rec = spec.build(model_fns.UserEmbedding(user_embedding))
  variables = (rec.global_variables if model_fns.UserEmbedding(user_embedding) == model_fns.UserEmbedding.LOCAL
               else rec.keras_model.variables)
  trainable = [v for v in variables if v.trainable]
  return tff.types.StructWithPythonType(
      [tff.TensorType(v.dtype.as_numpy_dtype, v.shape.as_list()) for v in trainable], list)


def _global_weight_bytes(spec, user_embedding) -> int:
  from tff_rec.training import model_fns  # pylint: disable=g-import-not-at-top

  rec = spec.build(model_fns.UserEmbedding(user_embedding))
  variables = (rec.global_variables if model_fns.UserEmbedding(user_embedding) == model_fns.UserEmbedding.LOCAL
               else rec.keras_model.variables)
  return sum(int(np.prod(v.shape.as_list(), dtype=np.int64)) * v.dtype.size for v in variables)


def aggregator_comm_stats(factory, spec, user_embedding, *, weighted: bool,
                          row_sparse_mean: bool = True) -> CommStats:
  """Per-client bytes of the model-update aggregation plus the model broadcast.

  `factory` None means the algorithm's default (`algorithms.build_process`):
  the row-sparse mean for FedAvg/FedProx with a user table (when
  `row_sparse_mean`), else TFF's mean. Upload: the aggregator's
  client-placed operands (for 'quantize8', per tensor of n elements above the
  threshold `4 * ceil(8n / 28) + 8` bytes: 8-bit codes packed 28 bits per
  int32 so every word is a 4-byte varint, plus float32 min and max; `4n`
  bytes for smaller tensors; plus the float32 weight of a weighted mean and
  two float32 per adaptive-norm estimator and one per zeroed/clipped count).
  Download: the global model weights in float32 plus the aggregator's
  broadcast parameters. Metric sums of the training process are not
  included (`process_comm_stats` has them).
  """
  from tff_rec.training import aggregators  # pylint: disable=g-import-not-at-top
  from tff_rec.training import model_fns  # pylint: disable=g-import-not-at-top

  value_type = model_update_type(spec, user_embedding)
  if factory is None:
    mask = (model_fns.embedding_table_mask(spec, model_fns.UserEmbedding(user_embedding))
            if row_sparse_mean and model_fns.UserEmbedding(user_embedding) != model_fns.UserEmbedding.LOCAL
            else [])
    if any(mask):
      factory = aggregators.RowSparseMeanFactory(mask)
    elif weighted:
      factory = tff.aggregators.MeanFactory()
    else:
      factory = tff.aggregators.UnweightedMeanFactory()
  if weighted:
    process = factory.create(value_type, tff.TensorType(np.float32))
  else:
    process = factory.create(value_type)
  up, down, calls = computation_comm_bytes(process.next)
  model_bytes = _global_weight_bytes(spec, user_embedding)
  return CommStats(up, down + model_bytes, type_bytes(value_type),
                   calls + (('model_broadcast', model_bytes),))


def process_comm_stats(process) -> CommStats:
  """Per-client bytes of one round of a whole learning process (`process.next`)."""
  up, down, calls = computation_comm_bytes(process.next)
  weights_type = process.get_model_weights.type_signature.result
  trainable = weights_type.trainable if hasattr(weights_type, 'trainable') else weights_type[0]
  return CommStats(up, down, type_bytes(trainable), calls)


def comm_metrics_fn(
    stats: CommStats,
    clients_per_round: Union[int, Callable[[int], int]],
) -> Callable[[int], Mapping[str, Any]]:
  """Per-round metrics: bytes per client and in total, both directions.

  `clients_per_round` is the number of clients in each round, or a function
  of the round number (e.g. for Poisson sampling). Totals are per-client
  bytes times clients (each sampled client downloads the broadcast once and
  uploads once).
  """
  if callable(clients_per_round):
    count = clients_per_round
  else:
    if int(clients_per_round) <= 0:
      raise ValueError(f'clients_per_round must be positive, got {clients_per_round}')
    count = lambda _: int(clients_per_round)

  def metrics(round_num: int) -> Mapping[str, Any]:
    n = int(count(round_num))
    return {
        'comm/bytes_per_client_upload': stats.upload_bytes,
        'comm/bytes_per_client_download': stats.download_bytes,
        'comm/bytes_client_to_server': stats.upload_bytes * n,
        'comm/bytes_server_to_client': stats.download_bytes * n,
        'comm/upload_compression': stats.upload_compression,
    }

  return metrics


def combine_metrics_fns(*fns: Optional[Callable[[int], Mapping[str, Any]]]) -> Optional[Callable[[int], Mapping[str, Any]]]:
  """One extra_metrics_fn merging several (None entries skipped)."""
  live = [f for f in fns if f is not None]
  if not live:
    return None

  def metrics(round_num: int) -> Mapping[str, Any]:
    out = {}
    for f in live:
      out.update(f(round_num))
    return out

  return metrics
