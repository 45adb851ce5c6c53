"""Score-preserving change of basis of dot-product MF tables, applied before pruning.

A dot-product MF scores through its user and item tables only as `U V^T`, so
`U R` and `V R^-T` score the same for any invertible `R`. `rotate_mf` moves
both tables to the balanced SVD basis: with `U V^T = A S B^T` (thin SVD),
`U' = A S^1/2` and `V' = B S^1/2`. Its columns are orthogonal, their energy
falls with the singular values, and of all factorizations of `U V^T` it has
the least `|U|^2 + |V|^2` (the row L2 penalty MF trains with). Magnitude
pruning in this basis removes the weak directions first (a low-rank plus
sparse approximation) instead of the small entries of whatever basis
training ended in, and the zeros gather in the trailing columns, which gzip
stores compactly.

Only models whose two tables meet in a `Dot` layer and nowhere else qualify
(`tff_rec.models.mf`); NeuMF's GMF branch (element-wise product, then Dense)
and two-tower models (Dense towers) do not.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_rec.models import base

BASES = ('auto', 'svd', 'none')
USER_TABLE = 'user_embedding'
ITEM_TABLE = 'item_embedding'


def _producer(tensor) -> Optional[tf.keras.layers.Layer]:
  history = getattr(tensor, '_keras_history', None)
  return history.layer if history is not None else None


def dot_tables(model: tf.keras.Model) -> Optional[tuple[str, str]]:
  """(user table, item table) names if `model` scores by their dot product only, else None."""
  names = {layer.name for layer in model.layers}
  if not {USER_TABLE, ITEM_TABLE} <= names:
    return None
  user, item = model.get_layer(USER_TABLE), model.get_layer(ITEM_TABLE)
  if not (isinstance(user, base.EmbeddingLookup) and isinstance(item, base.EmbeddingLookup)):
    return None
  if user.output_dim != item.output_dim:
    return None
  consumers = []
  for table in (user, item):
    nodes = table._outbound_nodes  # pylint: disable=protected-access
    if len(nodes) != 1:
      return None
    consumers.append(nodes[0].outbound_layer)
  dot = consumers[0]
  if consumers[1] is not dot or not isinstance(dot, tf.keras.layers.Dot) or dot.normalize:
    return None
  if {_producer(t) for t in tf.nest.flatten(dot.input)} != {user, item}:
    return None
  return USER_TABLE, ITEM_TABLE


def balanced_svd(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(U', V', singular values) with U' V'^T = U V^T in the balanced SVD basis."""
  if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
    raise ValueError(f'tables must be 2-D with equal widths, got {u.shape} and {v.shape}')
  dim = u.shape[1]
  qu, ru = np.linalg.qr(u.astype(np.float64))
  qv, rv = np.linalg.qr(v.astype(np.float64))
  a, s, bt = np.linalg.svd(ru @ rv.T)
  rank = s.shape[0]
  root = np.sqrt(s)
  u2 = np.zeros((u.shape[0], dim))
  v2 = np.zeros((v.shape[0], dim))
  u2[:, :rank] = (qu @ a[:, :rank]) * root
  v2[:, :rank] = (qv @ bt[:rank].T) * root
  # The sign of each singular pair is arbitrary: make each column's largest
  # user entry positive, so the result does not depend on LAPACK's choice.
  signs = np.sign(u2[np.argmax(np.abs(u2), axis=0), np.arange(dim)])
  signs[signs == 0] = 1.0
  return (u2 * signs).astype(u.dtype), (v2 * signs).astype(v.dtype), s


def resolve(basis: str, model: tf.keras.Model, exclude: Sequence[str] = ()) -> str:
  """'svd' or 'none' for `model`; 'auto' is 'svd' where it applies. Raises if 'svd' cannot."""
  if basis not in BASES:
    raise ValueError(f'basis must be one of {list(BASES)}, got {basis!r}')
  if basis == 'none':
    return 'none'
  tables = dot_tables(model)
  if tables is None:
    reason = f'model {model.name!r} does not score by a dot product of {USER_TABLE} and {ITEM_TABLE}'
  elif set(tables) & set(exclude):
    reason = f'{sorted(set(tables) & set(exclude))} stay on the device (excluded from pruning)'
  else:
    return 'svd'
  if basis == 'svd':
    raise ValueError(f'the SVD basis needs a dot-product MF with both tables on the server: {reason}')
  return 'none'


def rotate_mf(model: tf.keras.Model) -> np.ndarray:
  """Moves `model`'s MF tables to the balanced SVD basis in place; returns the singular values."""
  tables = dot_tables(model)
  if tables is None:
    raise ValueError(f'model {model.name!r} does not score by a dot product of {USER_TABLE} '
                     f'and {ITEM_TABLE}')
  user, item = (model.get_layer(name) for name in tables)
  u2, v2, s = balanced_svd(user.get_weights()[0], item.get_weights()[0])
  user.set_weights([u2])
  item.set_weights([v2])
  return s
