"""Secure aggregation as a protocol: SecAgg and SecAgg+, simulated client by client.

SecAgg is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017 (Fig. 4, the honest-but-curious variant); SecAgg+
is Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, which replaces the complete graph of pairwise masks by a
sparse random Harary graph.

Why this module is our own: TFF 0.87 has no cryptographic secure aggregation
(`federated_secure_sum*` is a plain sum in its simulation runtime), and
neither TF Privacy nor any package on the registries offers SecAgg for plain
Python (Flower's SecAgg+ lives inside Flower's runtime). The protocol is
therefore written here, but every cryptographic primitive comes from the
`cryptography` package: X25519 key agreement, HKDF-SHA256, AES-256-GCM for the
shares sent through the server, AES-256-CTR as the PRG that expands mask
seeds. The only arithmetic written here is Shamir secret sharing over the
prime field GF(2^521 - 1) and modular vector sums.

Inputs are integer vectors in Z_{2^b} (1 <= b <= 64), as the distributed-DP
aggregator produces (`--ddp_bits`). `Client` holds everything private (its
input, secret keys, self-mask seed, the shares it received); `Server` only
ever receives public keys, ciphertexts addressed to other clients, masked
vectors and the shares clients reveal in the last round. `run_protocol`
carries the messages between them, round by round, with configurable
dropouts after each round.

Rounds (b_u: self-mask seed; s_u: the mask key pair; N(u): u's neighbours):
  0. AdvertiseKeys: u sends two X25519 public keys, c_u (to encrypt shares)
     and s_u (to agree pairwise mask seeds).
  1. ShareKeys: u splits b_u and s_u's secret key into t-of-|N(u)| Shamir
     shares, one per neighbour (itself included), encrypts each under
     HKDF(X25519(c_u, c_v)) with AES-GCM, the pair (u, v) as associated data,
     and sends the ciphertexts to the server for routing.
  2. MaskedInputCollection: y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u}
     PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv) mod 2^b, over the
     neighbours that completed round 1; s_uv = HKDF(X25519(s_u, s_v)) = s_vu,
     so the pairwise masks of two surviving neighbours cancel.
  3. Unmasking: the server names the clients whose masked input arrived. For
     each neighbour u, a client reveals its share of b_u if u survived, of
     s_u's secret key if u dropped, never both (it refuses a request that
     would reveal both, or that names fewer than t survivors). The server
     reconstructs them, removes the survivors' self-masks and the dropped
     clients' dangling pairwise masks, and gets sum_{u survived} x_u mod 2^b.

Security model and limits (say so in results): honest-but-curious server and
clients; a threshold t > |N(u)| / 2 per neighbourhood, so that no set of
clients the server could ask reveals both secrets of one client; no PKI or
signatures (the actively secure variant's consistency round), so a malicious
server could lie about who dropped. Recovery works while at least t of each
needed neighbourhood answer round 3; below that `run_protocol` raises
`SecAggError` naming the client and the count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
import time
from typing import Mapping, Optional, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers import modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2 ** 521 - 1  # A Mersenne prime > 2^256: holds a 32-byte seed or X25519 key.
GRAPHS = ('complete', 'harary')
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class SecAggError(RuntimeError):
  """The protocol cannot finish (too few survivors or shares), or a message was refused."""


# ---------------------------------------------------------------------------
# Primitives.


def shamir_split(secret: int, holders: Sequence[int], threshold: int, *,
                 prime: int = PRIME) -> dict[int, int]:
  """Shamir t-of-n shares of `secret`, one per holder (evaluated at holder + 1).

  Args:
    secret: An integer in [0, prime).
    holders: Distinct non-negative ids of the share holders.
    threshold: Shares needed to reconstruct (1 <= threshold <= len(holders)).
    prime: The field's modulus.

  Returns:
    {holder: share}.

  Raises:
    ValueError: A secret outside the field, or a threshold out of range.
  """
  if not 0 <= secret < prime:
    raise ValueError('the secret must be in [0, prime)')
  if not 1 <= threshold <= len(holders):
    raise ValueError(f'threshold {threshold} must be in [1, {len(holders)} holders]')
  coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
  shares = {}
  for h in holders:
    x, y = h + 1, 0
    for c in reversed(coefficients):
      y = (y * x + c) % prime
    shares[h] = y
  return shares


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(holders: tuple, prime: int) -> tuple:
  """The Lagrange weights at 0 of the points x = holder + 1 (shared by every secret they hold)."""
  weights = []
  for i, hi in enumerate(holders):
    num, den = 1, 1
    for j, hj in enumerate(holders):
      if i != j:
        num = num * (-(hj + 1)) % prime
        den = den * ((hi + 1) - (hj + 1)) % prime
    weights.append(num * pow(den, -1, prime) % prime)
  return tuple(weights)


def shamir_reconstruct(shares: Mapping[int, int], threshold: int, *, prime: int = PRIME) -> int:
  """The secret from at least `threshold` shares (Lagrange interpolation at 0).

  Args:
    shares: {holder: share}, as `shamir_split` made them.
    threshold: The t they were made with; the first t holders (by id) are used.
    prime: The field's modulus.

  Returns:
    The secret.

  Raises:
    SecAggError: Fewer than `threshold` shares.
  """
  if len(shares) < threshold:
    raise SecAggError(f'{len(shares)} shares, {threshold} needed')
  points = sorted(shares.items())[:threshold]
  weights = _lagrange_at_zero(tuple(h for h, _ in points), prime)
  return sum(w * y for w, (_, y) in zip(weights, points)) % prime


def _kdf(shared: bytes, info: bytes) -> bytes:
  return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
  """`length` uniform values in Z_{2^bits} from a 32-byte seed (AES-256-CTR keystream)."""
  stream = Cipher(algorithms.AES(seed), modes.CTR(b'\0' * 16)).encryptor().update(
      b'\0' * (8 * length))
  return _reduce(np.frombuffer(stream, '<u8').copy(), bits)


def _reduce(v: np.ndarray, bits: int) -> np.ndarray:
  return v if bits == 64 else v & np.uint64((1 << bits) - 1)


def _int(b: bytes) -> int:
  return int.from_bytes(b, 'big')


def _bytes32(i: int) -> bytes:
  return i.to_bytes(32, 'big')


def harary_degree(n: int, degree: Optional[int] = None) -> int:
  """SecAgg+'s graph degree for n clients (even, < n): given, or 2 round(1.5 log2 n).

  O(log n) as in Bell et al. 2020, not computed from their bound for a given
  corrupt/dropout fraction.
  """
  d = degree if degree is not None else 2 * round(1.5 * math.log2(max(n, 2)))
  return max(2, min(d, n - 1 - (n - 1) % 2))


def neighbours(num_clients: int, graph: str, degree: Optional[int] = None,
               seed: Optional[int] = None) -> dict[int, frozenset]:
  """Each client's neighbours, itself included.

  Args:
    num_clients: Clients 0..n-1.
    graph: 'complete' (SecAgg) or 'harary' (SecAgg+: clients on a randomly
      permuted ring, each joined to the `degree` / 2 nearest on either side).
    degree: The Harary graph's even degree (< num_clients).
    seed: The ring permutation's seed (None: fresh randomness).

  Returns:
    {client: frozenset of neighbours including the client}.

  Raises:
    ValueError: An unknown graph or a bad degree.
  """
  if graph not in GRAPHS:
    raise ValueError(f'graph must be one of {list(GRAPHS)}, got {graph!r}')
  everyone = frozenset(range(num_clients))
  if graph == 'complete' or (degree is not None and degree >= num_clients - 1):
    return {u: everyone for u in range(num_clients)}
  if degree is None or degree < 2 or degree % 2:
    raise ValueError(f'the Harary graph needs an even degree >= 2, got {degree}')
  ring = np.random.default_rng(seed).permutation(num_clients)
  where = {int(u): i for i, u in enumerate(ring)}
  out = {}
  for u in range(num_clients):
    i = where[u]
    out[u] = frozenset(int(ring[(i + d) % num_clients]) for d in range(-degree // 2, degree // 2 + 1))
  return out


# ---------------------------------------------------------------------------
# The parties.


@dataclasses.dataclass(frozen=True)
class PublicKeys:
  c_pk: bytes  # encrypts shares
  s_pk: bytes  # agrees pairwise mask seeds


class Client:
  """One client's side of the protocol; nothing private leaves it except as a protocol message."""

  def __init__(self, cid: int, x: np.ndarray, *, bits: int):
    self.cid = cid
    self.bits = bits
    self._x = _reduce(np.asarray(x, np.uint64), bits)
    self._c_sk = x25519.X25519PrivateKey.generate()
    self._s_sk = x25519.X25519PrivateKey.generate()
    self._b = secrets.token_bytes(32)
    self._keys: dict[int, PublicKeys] = {}
    self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of s_sk)
    self._masked_with: frozenset = frozenset()
    self._threshold = 0

  # Round 0.
  def advertise_keys(self) -> PublicKeys:
    return PublicKeys(self._c_sk.public_key().public_bytes(**_RAW),
                      self._s_sk.public_key().public_bytes(**_RAW))

  def _share_key(self, v: int) -> bytes:
    peer = x25519.X25519PublicKey.from_public_bytes(self._keys[v].c_pk)
    return _kdf(self._c_sk.exchange(peer), b'secagg share encryption')

  # Round 1.
  def share_keys(self, keys: Mapping[int, PublicKeys], threshold: int) -> dict[int, bytes]:
    """Encrypted shares of b_u and s_u's secret key, one ciphertext per neighbour."""
    if len({k.c_pk for k in keys.values()}) != len(keys):
      raise SecAggError(f'client {self.cid}: two neighbours advertised the same key')
    self._keys = dict(keys)
    self._threshold = threshold
    holders = sorted(keys)
    s_secret = _int(self._s_sk.private_bytes(serialization.Encoding.Raw,
                                             serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption()))
    b_shares = shamir_split(_int(self._b), holders, threshold)
    s_shares = shamir_split(s_secret, holders, threshold)
    out = {}
    for v in holders:
      plain = self.cid.to_bytes(4, 'big') + v.to_bytes(4, 'big') + b_shares[v].to_bytes(
          66, 'big') + s_shares[v].to_bytes(66, 'big')
      nonce = secrets.token_bytes(12)
      out[v] = nonce + AESGCM(self._share_key(v)).encrypt(nonce, plain, _ad(self.cid, v))
    return out

  # Round 2.
  def masked_input(self, ciphertexts: Mapping[int, bytes]) -> np.ndarray:
    """Stores the shares addressed to it; returns x_u plus its self mask and pairwise masks."""
    for u, blob in ciphertexts.items():
      if u not in self._keys:
        raise SecAggError(f'client {self.cid}: a share from {u}, not a neighbour')
      try:
        plain = AESGCM(self._share_key(u)).decrypt(blob[:12], blob[12:], _ad(u, self.cid))
      except Exception as e:  # cryptography's InvalidTag
        raise SecAggError(f'client {self.cid}: the share from {u} fails authentication') from e
      if _int(plain[:4]) != u or _int(plain[4:8]) != self.cid:
        raise SecAggError(f'client {self.cid}: a share from {u} names the wrong parties')
      self._held[u] = (_int(plain[8:74]), _int(plain[74:140]))
    if len(ciphertexts) < self._threshold:
      raise SecAggError(f'client {self.cid}: {len(ciphertexts)} neighbours left, '
                        f't={self._threshold} needed')
    self._masked_with = frozenset(ciphertexts)
    y = self._x + prg(self._b, self._x.size, self.bits)
    for v in sorted(self._masked_with - {self.cid}):
      seed = pairwise_seed(self._s_sk, self._keys[v].s_pk)
      mask = prg(seed, self._x.size, self.bits)
      y = y + mask if v > self.cid else y - mask
    return _reduce(y, self.bits)

  # Round 3.
  def unmask(self, survivors: frozenset, dropped: frozenset) -> dict[int, tuple[str, int]]:
    """For each neighbour it holds a share of: ('b', share) if it survived, ('s', share) if not."""
    if survivors & dropped:
      raise SecAggError(f'client {self.cid}: asked to reveal both secrets of '
                        f'{sorted(survivors & dropped)}')
    if len(survivors & self._masked_with) < self._threshold:
      raise SecAggError(f'client {self.cid}: only {len(survivors & self._masked_with)} '
                        f'surviving neighbours, t={self._threshold} needed')
    out = {}
    for u, (b_share, s_share) in self._held.items():
      if u in survivors:
        out[u] = ('b', b_share)
      elif u in dropped:
        out[u] = ('s', s_share)
    return out


def _ad(sender: int, recipient: int) -> bytes:
  return f'secagg share {sender}->{recipient}'.encode()


def pairwise_seed(own: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
  """s_uv = HKDF(X25519(own, peer)): the same seed on both sides."""
  peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
  return _kdf(own.exchange(peer), b'secagg pairwise mask')


class Server:
  """The server's side: routes messages and unmasks the sum. Sees no input and no secret key."""

  def __init__(self, *, graph: Mapping[int, frozenset], threshold: int, bits: int, length: int):
    self.graph = graph
    self.threshold = threshold
    self.bits = bits
    self.length = length
    self.keys: dict[int, PublicKeys] = {}
    self.shared: frozenset = frozenset()
    self.masked: dict[int, np.ndarray] = {}

  def collect_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
    self._check(len(keys), 'advertised keys')
    self.keys = dict(keys)
    return {u: {v: keys[v] for v in self.graph[u] if v in keys} for u in keys}

  def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
    self._check(len(sent), 'shared keys')
    self.shared = frozenset(sent)
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in sent}
    for u, cts in sent.items():
      for v, ct in cts.items():
        if v in inbox:
          inbox[v][u] = ct
    return inbox

  def collect_masked(self, masked: Mapping[int, np.ndarray]) -> tuple[frozenset, frozenset]:
    self._check(len(masked), 'sent masked inputs')
    for u, y in masked.items():
      if y.shape != (self.length,):
        raise SecAggError(f'client {u}: masked input of shape {y.shape}, expected ({self.length},)')
    self.masked = dict(masked)
    survivors = frozenset(masked)
    return survivors, self.shared - survivors

  def unmask(self, revealed: Mapping[int, Mapping[int, tuple[str, int]]]) -> np.ndarray:
    """sum_{u survived} x_u mod 2^bits from the revealed shares."""
    self._check(len(revealed), 'answered the unmasking round')
    survivors = frozenset(self.masked)
    total = np.zeros(self.length, np.uint64)
    for y in self.masked.values():
      total = total + y
    for u in sorted(self.shared):
      kind = 'b' if u in survivors else 's'
      shares = {v: s for v, msg in revealed.items() if u in msg
                for k, s in [msg[u]] if k == kind}
      if len(shares) < self.threshold:
        raise SecAggError(
            f'client {u} ({"survived" if kind == "b" else "dropped"}): {len(shares)} of its '
            f'neighbours revealed a share, t={self.threshold} needed; the sum cannot be unmasked')
      secret = shamir_reconstruct(shares, self.threshold)
      if kind == 'b':
        total = total - prg(_bytes32(secret), self.length, self.bits)
        continue
      s_sk = x25519.X25519PrivateKey.from_private_bytes(_bytes32(secret))
      for v in sorted((self.graph[u] & survivors) - {u}):
        mask = prg(pairwise_seed(s_sk, self.keys[v].s_pk), self.length, self.bits)
        # v added +mask if u > v, -mask if u < v; take it back out.
        total = total - mask if u > v else total + mask
    return _reduce(total, self.bits)

  def _check(self, n: int, what: str) -> None:
    if n < self.threshold:
      raise SecAggError(f'only {n} clients {what}; at least t={self.threshold} must')


# ---------------------------------------------------------------------------
# Driver.


@dataclasses.dataclass
class SecAggResult:
  """What one protocol run produced and cost.

  Attributes:
    total: sum of the survivors' inputs mod 2^bits (uint64[length]).
    survivors: The clients whose input is in `total`.
    client_seconds: Mean CPU seconds of a surviving client, over all its rounds.
    server_seconds: Server CPU seconds.
    upload_bytes: Mean bytes a surviving client sent (keys, ciphertexts, masked
      vector at bits/8 bytes per value, revealed shares).
    message_rounds: Client-server round trips (4).
  """

  total: np.ndarray
  survivors: frozenset
  client_seconds: float
  server_seconds: float
  upload_bytes: float
  message_rounds: int = 4


def run_protocol(
    inputs: Mapping[int, np.ndarray],
    *,
    bits: int,
    threshold: int,
    graph: str = 'complete',
    degree: Optional[int] = None,
    drop_after: Sequence[Sequence[int]] = ((), (), (), ()),
    graph_seed: Optional[int] = None,
) -> SecAggResult:
  """One secure sum of `inputs` (clients 0..n-1), with dropouts.

  Args:
    inputs: {client: uint vector in Z_{2^bits}}, clients numbered 0..n-1, all
      the same length.
    bits: The modulus 2^bits (1..64).
    threshold: t, shares needed to reconstruct a client's secrets; more than
      half of every neighbourhood.
    graph: 'complete' (SecAgg) or 'harary' (SecAgg+).
    degree: The Harary graph's even degree.
    drop_after: Four lists: the clients that drop out before rounds 0, 1, 2
      and 3 (AdvertiseKeys, ShareKeys, MaskedInputCollection, Unmasking).
    graph_seed: Seed of the Harary ring (None: fresh).

  Returns:
    A `SecAggResult`; `total` is the sum over the clients that sent a masked
    input.

  Raises:
    ValueError: Bad bits, threshold, graph or inputs.
    SecAggError: Too few clients left in some round, or too few shares to
      unmask a needed secret.
  """
  n = len(inputs)
  if sorted(inputs) != list(range(n)):
    raise ValueError('clients must be numbered 0..n-1')
  if not 1 <= bits <= 64:
    raise ValueError(f'bits must be in [1, 64], got {bits}')
  lengths = {np.asarray(x).shape for x in inputs.values()}
  if len(lengths) != 1 or len(next(iter(lengths))) != 1:
    raise ValueError(f'inputs must be vectors of one length, got shapes {sorted(lengths)}')
  if len(drop_after) != 4:
    raise ValueError('drop_after needs one list per round (4)')
  graph_map = neighbours(n, graph, degree, graph_seed)
  smallest = min(len(g) for g in graph_map.values())
  if not smallest / 2 < threshold <= smallest:
    raise ValueError(f'threshold must be in ({smallest / 2:g}, {smallest}] for neighbourhoods of '
                     f'{smallest} clients, got {threshold}')
  (length,) = next(iter(lengths))
  client_cpu = {u: 0.0 for u in inputs}
  upload = {u: 0 for u in inputs}

  def timed(u, fn, *args):
    start = time.process_time()
    out = fn(*args)
    client_cpu[u] += time.process_time() - start
    return out

  server_cpu = 0.0

  def server(fn, *args):
    nonlocal server_cpu
    start = time.process_time()
    out = fn(*args)
    server_cpu += time.process_time() - start
    return out

  clients = {u: Client(u, x, bits=bits) for u, x in inputs.items()}
  srv = Server(graph=graph_map, threshold=threshold, bits=bits, length=length)
  alive = set(inputs)

  alive -= set(drop_after[0])
  keys = {u: timed(u, clients[u].advertise_keys) for u in sorted(alive)}
  for u in keys:
    upload[u] += 64
  routed_keys = server(srv.collect_keys, keys)

  alive -= set(drop_after[1])
  sent = {u: timed(u, clients[u].share_keys, routed_keys[u], threshold) for u in sorted(alive)}
  for u, cts in sent.items():
    upload[u] += sum(len(c) for c in cts.values())
  inbox = server(srv.route_shares, sent)

  alive -= set(drop_after[2])
  masked = {u: timed(u, clients[u].masked_input, inbox[u]) for u in sorted(alive)}
  for u in masked:
    upload[u] += length * bits // 8
  survivors, dropped = server(srv.collect_masked, masked)

  alive -= set(drop_after[3])
  revealed = {u: timed(u, clients[u].unmask, survivors, dropped) for u in sorted(alive)}
  for u, msg in revealed.items():
    upload[u] += 70 * len(msg)
  total = server(srv.unmask, revealed)
  return SecAggResult(total=total, survivors=survivors,
                      client_seconds=float(np.mean([client_cpu[u] for u in survivors])),
                      server_seconds=server_cpu,
                      upload_bytes=float(np.mean([upload[u] for u in survivors])))
