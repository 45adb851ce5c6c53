"""Homomorphically encrypted aggregation: clients encrypt, the server adds ciphertexts.

The FATE-style alternative to secure aggregation (`privacy/secagg.py`): each
client encrypts its integer vector under a public key, the server adds the
ciphertexts without being able to read any of them, and only the holder of
the secret key decrypts, and only the sum.

Scheme: BFV (Brakerski/Fan-Vercauteren) from TenSEAL (Microsoft SEAL
underneath), batched, N = 8192 slots per ciphertext, SEAL's default 218-bit
coefficient modulus for N = 8192 (128-bit security by the
HomomorphicEncryption.org standard). BFV and not CKKS: the vectors are the
integers in Z_{2^b} that distributed DP produces, and BFV adds integers
exactly, where CKKS is approximate. BFV and not Paillier (python-paillier):
one BFV encryption packs 8192 values, so a 55k-value update is 7
ciphertexts (about 3 MB) instead of 55k Paillier ciphertexts or, packed,
~1000 2048-bit encryptions.
The plaintext modulus is a prime p = 1 mod 2N (needed for batching) larger
than twice the largest possible sum, n (2^b - 1), so that the sum of the
ciphertexts decrypts to the exact integer sum, which is then reduced mod
2^b; SEAL allows p up to 60 bits, so b + log2(n) must stay below 59.

Decryption is key-holder based, not threshold: a `KeyHolder` (FATE's
"arbiter"; in a deployment a separate party such as an auditor or a
trusted-execution enclave) generates the key pair, publishes the public
context, and decrypts the one aggregate ciphertext the server sends it.
Why not threshold decryption: neither TenSEAL/SEAL nor python-paillier
implements distributed key generation or threshold decryption, and writing
lattice threshold decryption ourselves (with its noise-flooding
requirements) is beyond what this toolkit should own. The consequence is
the trust model: the server learns nothing but the sum as long as it does
not collude with the key holder; a key holder that obtained individual
ciphertexts could decrypt them. SecAgg needs no such party.

Why this module is our own: TFF 0.87 has no HE aggregation, and TenSEAL
provides the scheme but not the protocol (who holds which key, what is
sent, the exactness bound), which is all this module adds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np

SLOTS = 8192  # BFV poly modulus degree = batch size.
MAX_PLAIN_BITS = 60  # SEAL's limit on the plaintext modulus.


class HeError(RuntimeError):
  """The HE aggregation cannot proceed (missing package, sum too wide, bad ciphertext)."""


def _tenseal():
  try:
    import tenseal  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise HeError('--secure_aggregation=he needs the TenSEAL package: '
                  'pip install tenseal==0.3.18 (it is in requirements.txt)') from e
  return tenseal


def _is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin for n < 3.3e24 (these bases suffice)."""
  if n < 2:
    return False
  bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
  for p in bases:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d //= 2
    s += 1
  for a in bases:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def plain_modulus(bits: int, num_clients: int) -> int:
  """The smallest prime p = 1 mod 2N with p > 2 n (2^bits - 1): exact sums, batching.

  Raises:
    HeError: The sum of `num_clients` `bits`-bit values needs more than
      SEAL's 60-bit plaintext modulus.
  """
  bound = 2 * num_clients * ((1 << bits) - 1) + 1
  step = 2 * SLOTS
  p = (bound // step + 1) * step + 1
  while not _is_prime(p):
    p += step
  if p.bit_length() > MAX_PLAIN_BITS:
    raise HeError(f'a sum of {num_clients} values of {bits} bits needs a {p.bit_length()}-bit '
                  f'plaintext modulus; BFV in SEAL allows {MAX_PLAIN_BITS}')
  return p


class KeyHolder:
  """Generates the BFV key pair, publishes the public context, decrypts the aggregate only."""

  def __init__(self, *, bits: int, num_clients: int):
    ts = _tenseal()
    self.bits = bits
    self.modulus = plain_modulus(bits, num_clients)
    self._context = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=SLOTS,
                               plain_modulus=self.modulus)
    self.public_context = self._context.serialize(save_secret_key=False)

  def decrypt(self, blobs: Sequence[bytes], length: int) -> np.ndarray:
    """The aggregate ciphertexts (one per block of N values) as uint64[length] mod 2^bits."""
    ts = _tenseal()
    values = []
    for blob in blobs:
      values.extend(ts.bfv_vector_from(self._context, blob).decrypt())
    out = np.asarray(values[:length], dtype=object)
    out = np.where(out < 0, out + self.modulus, out)  # SEAL decodes centred values.
    return np.asarray([int(v) % (1 << self.bits) for v in out], np.uint64)


class HeClient:
  """Encrypts one client's vector under the public context (it never sees a secret key)."""

  def __init__(self, public_context: bytes):
    ts = _tenseal()
    self._context = ts.context_from(public_context)
    if self._context.is_private():
      raise HeError('a client was given a context holding the secret key')

  def encrypt(self, x: np.ndarray) -> list[bytes]:
    ts = _tenseal()
    x = np.asarray(x, np.int64)
    return [ts.bfv_vector(self._context, x[i:i + SLOTS].tolist()).serialize()
            for i in range(0, x.size, SLOTS)]


class HeServer:
  """Adds ciphertexts; holds only the public context."""

  def __init__(self, public_context: bytes):
    ts = _tenseal()
    self._context = ts.context_from(public_context)

  def add(self, uploads: Mapping[int, Sequence[bytes]]) -> list[bytes]:
    ts = _tenseal()
    blocks = {len(v) for v in uploads.values()}
    if len(blocks) != 1:
      raise HeError(f'clients sent different numbers of ciphertexts: {sorted(blocks)}')
    total = None
    for u in sorted(uploads):
      try:
        cts = [ts.bfv_vector_from(self._context, b) for b in uploads[u]]
      except Exception as e:  # TenSEAL raises ValueError/RuntimeError on bad bytes.
        raise HeError(f'client {u}: a ciphertext does not deserialize: {e}') from e
      total = cts if total is None else [a + b for a, b in zip(total, cts)]
    return [c.serialize() for c in total]


@dataclasses.dataclass
class HeResult:
  """What one encrypted sum produced and cost (fields as `secagg.SecAggResult`).

  Attributes:
    total: Sum of the survivors' inputs mod 2^bits (uint64[length]).
    survivors: The clients whose ciphertexts were added.
    client_seconds: Mean CPU seconds of a client (load context, encrypt).
    server_seconds: Server CPU seconds (adding ciphertexts).
    keyholder_seconds: Key generation and decryption of the aggregate.
    upload_bytes: Mean bytes a client sent (its serialized ciphertexts).
    message_rounds: Client upload, then server -> key holder -> server.
  """

  total: np.ndarray
  survivors: frozenset
  client_seconds: float
  server_seconds: float
  keyholder_seconds: float
  upload_bytes: float
  message_rounds: int = 2


def run_protocol(inputs: Mapping[int, np.ndarray], *, bits: int,
                 dropped: Sequence[int] = ()) -> HeResult:
  """One encrypted sum of `inputs` ({client: uint vector in Z_{2^bits}}).

  A client in `dropped` never uploads; the sum is over the others (HE needs
  no recovery step: the server adds whatever arrived).

  Raises:
    ValueError: Inputs of different lengths or out of range; nobody left.
    HeError: TenSEAL missing, or the sum too wide for BFV's plaintext modulus.
  """
  lengths = {np.asarray(x).shape for x in inputs.values()}
  if len(lengths) != 1 or len(next(iter(lengths))) != 1:
    raise ValueError(f'inputs must be vectors of one length, got shapes {sorted(lengths)}')
  if not 1 <= bits <= MAX_PLAIN_BITS:
    raise ValueError(f'bits must be in [1, {MAX_PLAIN_BITS}], got {bits}')
  (length,) = next(iter(lengths))
  survivors = frozenset(inputs) - frozenset(dropped)
  if not survivors:
    raise ValueError('every client dropped out')
  start = time.process_time()
  holder = KeyHolder(bits=bits, num_clients=len(inputs))
  keyholder = time.process_time() - start
  uploads, client_cpu = {}, []
  for u in sorted(survivors):
    x = np.asarray(inputs[u], np.uint64)
    if x.size and int(x.max()) >= (1 << bits):
      raise ValueError(f'client {u}: a value does not fit in {bits} bits')
    start = time.process_time()
    uploads[u] = HeClient(holder.public_context).encrypt(x)
    client_cpu.append(time.process_time() - start)
  start = time.process_time()
  total_ct = HeServer(holder.public_context).add(uploads)
  server = time.process_time() - start
  start = time.process_time()
  total = holder.decrypt(total_ct, length)
  keyholder += time.process_time() - start
  return HeResult(total=total, survivors=survivors, client_seconds=float(np.mean(client_cpu)),
                  server_seconds=server, keyholder_seconds=keyholder,
                  upload_bytes=float(np.mean([sum(map(len, v)) for v in uploads.values()])))
