"""Federated rounds whose secure sums run as a cryptographic protocol (SecAgg, SecAgg+, HE).

TFF 0.87 executes `federated_secure_sum_bitwidth` (what distributed DP's
aggregator uses) as a plain sum inside the computation: the server-side
code sees every client's vector. `SecureRoundProcess` runs the same learning
process the way a production platform runs a TFF computation: compiled by
TFF to its `MapReduceForm` (`tff.backends.mapreduce`), the contract between
TFF and a deployment whose secure-aggregation protocol sits between the
clients' `work` and the server's `update`. One round:

  inside TFF computations (the toolkit's execution context, C++ runtime):
    1. `prepare` on the server state, broadcast; `work` on every selected
       client (local training, then the distributed-DP encoding: clip,
       rotate, discretize, Skellam noise shares, modular clipping). The
       clients' outputs are returned from the computation as CLIENTS-placed
       values, one per client, without being summed.
  in the simulation driver (this module, per client, then the server):
    2. each client's secure-sum inputs (the integer vectors of
       `secure_sum_bitwidth`, `secure_sum_max_input`, `secure_modular_sum`)
       are flattened into one vector in Z_{2^B} and given only to that
       client's protocol object (`secagg.Client` or `he_aggregation.HeClient`);
       the server object (`secagg.Server` / `he_aggregation.HeServer`) gets
       masked vectors and encrypted shares, or ciphertexts, and outputs the
       sum over the clients that survived the round. B is wide enough that
       the sum mod 2^B is the exact integer sum, so the result equals what
       TFF's plain-sum body computes, bit for bit.
  inside TFF computations again:
    3. `federated_aggregate` of the non-secure part (the clients' training
       metrics and zeroing counts, in the clear, as in TFF's own process) over
       the survivors, then `update` on the server state with the secure sums.

Why the driver and not a TFF computation: the protocol is four rounds of
messages with per-client secrets and public-key cryptography (the
`cryptography` package, TenSEAL), which TFF's intrinsics cannot express and
its runtime cannot execute; MapReduceForm is exactly the boundary TFF
defines for handing secure sums to such a protocol.

Dropouts: `dropout` drops that share of each round's clients after they
shared their keys and before they send their masked input (SecAgg: the
server recovers their pairwise masks; HE: they never upload). Their update,
their count and their metrics are all left out together, so the mean stays
consistent; but the distributed-DP noise they would have contributed is
missing, and the reported ε assumes every selected client reports (see
the README's privacy section).

Why this module is our own: TFF provides the form (`MapReduceForm`) but no
runner for it outside its tests; the runner is ~100 lines here.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Optional

import numpy as np
import tensorflow_federated as tff

from privacy import he_aggregation
from privacy import secagg

MODES = ('none', 'secagg', 'secagg_plus', 'he')
METRICS_KEY = 'secure_aggregation'


class SecureRoundError(RuntimeError):
  """A round cannot run under the protocol (input out of range, too wide, too few survivors)."""


@dataclasses.dataclass(frozen=True)
class SecureAggregationConfig:
  """How the secure sums of a round are computed.

  Attributes:
    mode: 'none' (TFF's simulated intrinsic: a plain sum inside the
      computation), 'secagg' (Bonawitz et al. 2017, complete graph),
      'secagg_plus' (Bell et al. 2020, random Harary graph) or 'he' (BFV,
      key-holder decryption).
    threshold: SecAgg: Shamir threshold t as a share of a neighbourhood
      (rounded up); must exceed 1/2.
    degree: SecAgg+: the Harary graph's even degree; None: 2 round(1.5 log2 n).
    dropout: Share of each round's clients dropped before they send their
      masked input / ciphertext (simulation of unreliable devices).
    seed: Seed of the dropout draws and the SecAgg+ graph (per round).
    verify: The driver also sums the survivors' vectors in the clear and
      stops the run unless the protocol's sum is identical (tests and
      benchmarks; it defeats the purpose in a deployment).
  """

  mode: str = 'none'
  threshold: float = 2 / 3
  degree: Optional[int] = None
  dropout: float = 0.0
  seed: int = 0
  verify: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'--secure_aggregation must be one of {list(MODES)}, got {self.mode!r}')
    if not 0.5 < self.threshold <= 1:
      raise ValueError(f'--secagg_threshold must be in (0.5, 1], got {self.threshold}')
    if not 0 <= self.dropout < 1:
      raise ValueError(f'--secagg_dropout must be in [0, 1), got {self.dropout}')
    if self.degree is not None and (self.degree < 2 or self.degree % 2):
      raise ValueError(f'--secagg_degree must be an even number >= 2, got {self.degree}')

  @property
  def enabled(self) -> bool:
    return self.mode != 'none'

  def report(self) -> dict:
    if not self.enabled:
      return {'mode': 'none'}
    out = {'mode': self.mode, 'dropout': self.dropout, 'seed': self.seed, 'verify': self.verify}
    if self.mode != 'he':
      out['threshold'] = self.threshold
    if self.mode == 'secagg_plus':
      out['degree'] = self.degree
    return out


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One tensor of the secure-sum inputs: where it sits in the flat vector and its bound."""

  kind: str  # 'bitwidth', 'max_input' or 'modular'
  shape: tuple
  dtype: Any
  bound: int  # exclusive upper bound of a client's value
  modulus: Optional[int]


def _slots(kind: str, value_type, params) -> list[_Slot]:
  flat_types = tff.structure.flatten(value_type)
  flat_params = tff.structure.flatten(params) if not isinstance(params, (int, np.integer)) else [
      params] * len(flat_types)
  if len(flat_params) != len(flat_types):  # One parameter for a whole structure.
    flat_params = [flat_params[0]] * len(flat_types)
  out = []
  for t, p in zip(flat_types, flat_params):
    p = int(np.asarray(p))
    if kind == 'bitwidth':
      bound, modulus = 1 << p, None
    elif kind == 'max_input':
      bound, modulus = p + 1, None
    else:
      bound, modulus = p, p
    out.append(_Slot(kind, tuple(t.shape), np.dtype(t.dtype).type, bound, modulus))
  return out


class SecureRoundProcess:
  """`initialize` / `next` / `get_model_weights` of a process, secure sums by protocol.

  The state is the wrapped process's state, unchanged in type, so checkpoints
  and resume work as without the protocol.
  """

  def __init__(self, process, config: SecureAggregationConfig):
    """Compiles `process.next` to TFF's MapReduceForm.

    Args:
      process: A learning process whose `next` takes (state, client data)
        (e.g. composed with a dataset computation, client ids as data).
      config: The protocol; `config.enabled` must be true.

    Raises:
      SecureRoundError: The process has no secure sums (the protocol would
        protect nothing), or it is not expressible in MapReduceForm.
    """
    if not config.enabled:
      raise ValueError('SecureRoundProcess needs a protocol, not mode none')
    self._process = process
    self._config = config
    self.initialize = process.initialize
    self.get_model_weights = process.get_model_weights
    self._round = 0
    try:
      mrf = tff.backends.mapreduce.get_map_reduce_form_for_computation(process.next)
    except Exception as e:  # TFF raises ValueError/TypeError for incompatible forms.
      raise SecureRoundError(
          f'--secure_aggregation={config.mode}: the training process cannot be split into '
          f"TFF's MapReduceForm ({type(e).__name__}: {e})") from e
    self._mrf = mrf
    work_out = mrf.work.type_signature.result
    self._slots = (_slots('bitwidth', work_out[1], mrf.secure_sum_bitwidth())
                   + _slots('max_input', work_out[2], mrf.secure_sum_max_input())
                   + _slots('modular', work_out[3], mrf.secure_modular_sum_modulus()))
    if not self._slots:
      raise SecureRoundError(
          f'--secure_aggregation={config.mode}: this run aggregates nothing with secure sums '
          '(only --dp=ddp does); the protocol would protect nothing')
    self._work_out = work_out
    state_type, data_type = process.next.type_signature.parameter
    self._state_type = state_type.member

    @tff.federated_computation(state_type, data_type)
    def client_phase(state, data):
      broadcast = tff.federated_broadcast(tff.federated_map(mrf.prepare, state))
      return tff.federated_map(mrf.work, tff.federated_zip([data, broadcast]))

    @tff.federated_computation(tff.FederatedType(work_out[0], tff.CLIENTS))
    def aggregate(values):
      return tff.federated_aggregate(values, mrf.zero(), mrf.accumulate, mrf.merge, mrf.report)

    self._client_phase = client_phase
    self._aggregate = aggregate

  def set_round(self, round_num: int) -> None:
    self._round = round_num

  def _flatten(self, outputs) -> np.ndarray:
    """One client's secure-sum inputs as uint64, in slot order; checks each range."""
    parts = []
    values = (tff.structure.flatten(outputs[1]) + tff.structure.flatten(outputs[2])
              + tff.structure.flatten(outputs[3]))
    if len(values) != len(self._slots):
      raise SecureRoundError(f'a client sent {len(values)} secure-sum tensors, the form has '
                             f'{len(self._slots)}')
    for k, (slot, v) in enumerate(zip(self._slots, values)):
      v = np.asarray(v)
      if v.size and (v.min() < 0 or int(v.max()) >= slot.bound):
        raise SecureRoundError(f'secure-sum input {k} ({slot.kind}) out of range [0, '
                               f'{slot.bound}): [{v.min()}, {v.max()}]')
      parts.append(v.astype(np.uint64).ravel())
    return np.concatenate(parts)

  def _unflatten(self, total: np.ndarray):
    out = {'bitwidth': [], 'max_input': [], 'modular': []}
    offset = 0
    for k, slot in enumerate(self._slots):
      size = int(np.prod(slot.shape, dtype=np.int64))
      v = total[offset:offset + size].astype(object)
      offset += size
      if slot.modulus is not None:
        v = v % slot.modulus
      info = np.iinfo(slot.dtype)
      if v.size and int(v.max()) > info.max:
        raise SecureRoundError(f'secure sum {k} ({slot.kind}) overflows {np.dtype(slot.dtype)}')
      out[slot.kind].append(np.asarray(v, slot.dtype).reshape(slot.shape))
    return [tff.structure.pack_sequence_as(self._work_out[i + 1], out[kind])
            if out[kind] else tff.structure.Struct([])
            for i, kind in enumerate(('bitwidth', 'max_input', 'modular'))]

  def _secure_sum(self, vectors: dict[int, np.ndarray], dropped: list[int]):
    n = len(vectors)
    bits = max(int(math.ceil(math.log2(n * (s.bound - 1) + 1))) for s in self._slots)
    bits = max(bits, 1)
    mode = self._config.mode
    if mode == 'he':
      result = he_aggregation.run_protocol(vectors, bits=bits, dropped=dropped)
      return result, bits
    if bits > 64:
      raise SecureRoundError(f'the secure sums need {bits} bits; SecAgg runs in Z_2^64 at most')
    graph = 'complete' if mode == 'secagg' else 'harary'
    degree = secagg.harary_degree(n, self._config.degree)
    size = n if graph == 'complete' else min(degree + 1, n)
    threshold = math.ceil(self._config.threshold * size)  # > size / 2: the config checks > 0.5
    result = secagg.run_protocol(
        vectors, bits=bits, threshold=threshold, graph=graph,
        degree=degree if graph == 'harary' else None,
        drop_after=((), (), tuple(dropped), ()),
        graph_seed=self._config.seed * 1_000_003 + self._round)
    return result, bits

  def next(self, state, data):
    """One round: clients' work in TFF, the secure sums by protocol, the update in TFF."""
    outputs = list(self._client_phase(state, data))
    n = len(outputs)
    rng = np.random.default_rng((self._config.seed, self._round))
    dropped = sorted(rng.choice(n, size=int(self._config.dropout * n), replace=False).tolist())
    vectors = {u: self._flatten(outputs[u]) for u in range(n)}
    try:
      result, bits = self._secure_sum(vectors, dropped)
    except (secagg.SecAggError, he_aggregation.HeError) as e:
      raise SecureRoundError(f'round {self._round}, --secure_aggregation='
                             f'{self._config.mode}: {e}') from e
    survivors = sorted(result.survivors)
    if self._config.verify:
      plain = np.zeros_like(result.total)
      for u in survivors:
        plain = plain + vectors[u]
      plain &= np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
      if not np.array_equal(plain, result.total):
        raise SecureRoundError(f'round {self._round}: the protocol sum differs from the plain sum')
    aggregated = self._aggregate([outputs[u][0] for u in survivors])
    bitwidth_sum, max_input_sum, modular_sum = self._unflatten(result.total)
    output = tff.structure.from_container(self._mrf.update(
        state, (aggregated, bitwidth_sum, max_input_sum, modular_sum)), recursive=True)
    new_state, metrics = output[0], output[1]  # MapReduceForm's (server state, server output).
    new_state = tff.types.type_to_py_container(new_state, self._state_type)
    metrics = tff.structure.to_odict(metrics, recursive=True)
    metrics[METRICS_KEY] = collections.OrderedDict(
        clients=len(survivors), dropped=len(dropped), bits=bits,
        upload_bytes=result.upload_bytes, client_cpu_s=result.client_seconds,
        server_cpu_s=result.server_seconds, exact_checked=int(self._config.verify))
    return tff.learning.templates.LearningProcessOutput(new_state, metrics)


def wrap(process, config: SecureAggregationConfig):
  """`process` itself for mode 'none', else a `SecureRoundProcess` around it."""
  if not config.enabled:
    return process
  return SecureRoundProcess(process, config)

