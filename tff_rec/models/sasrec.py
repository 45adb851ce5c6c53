"""SASRec: a causal self-attention sequential recommender (Kang and McAuley, ICDM 2018).

Follows the reference code (github kang205/SASRec, `model.py`, `modules.py`):

* the input is a user's last `maxlen` items, left-padded with 0; item
  embeddings are scaled by sqrt(d) (`modules.py` `embedding(scale=True)`) and a
  learned positional embedding over the window positions 0..maxlen-1 is added
  (`model.py:30-43`), then dropout, then padded positions are zeroed;
* each block: `Q = LayerNorm(x)`, `x = Q + MHA(Q, x, x)` with a causal mask
  and padded keys masked, then `y = LayerNorm(x)`, `x = y + FFN(y)` (two
  dense layers, ReLU, dropout after each), then padded positions are zeroed
  (`model.py:54-70`, residuals as in `modules.py`); a final LayerNorm;
* scores are dot products of the last hidden state with the (shared) item
  embedding table;
* the training objective (`model.py:88-96`): at every non-padded position,
  binary cross-entropy of the next item against one sampled negative. The
  `sampled_softmax` option instead takes a softmax over the next item and
  `num_negatives` sampled negatives at every position.

Attention is Keras' `MultiHeadAttention`, which has an output projection the
reference lacks (SASRec.pytorch's `nn.MultiheadAttention` has one too); LayerNorm
epsilon is the reference's 1e-8. Nothing here reads data or trains: see
`tff_rec.training.sequential`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

LOSSES = ('bce', 'sampled_softmax')
_LN_EPSILON = 1e-8


class SelfAttentionBlock(tf.keras.layers.Layer):
  """One SASRec block: causal multi-head self-attention and a point-wise feed-forward net."""

  def __init__(self, hidden_units: int, num_heads: int, dropout: float, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    if hidden_units % num_heads:
      raise ValueError(f'hidden_units ({hidden_units}) must be divisible by num_heads ({num_heads})')
    init = lambda k: tf.keras.initializers.GlorotUniform(seed=seed * 100 + k)  # pylint: disable=unnecessary-lambda-assignment
    self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=_LN_EPSILON, name='attention_norm')
    self.attention = tf.keras.layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=hidden_units // num_heads, dropout=dropout,
        kernel_initializer=init(1), name='attention')
    self.ffn_norm = tf.keras.layers.LayerNormalization(epsilon=_LN_EPSILON, name='ffn_norm')
    self.ffn_inner = tf.keras.layers.Dense(hidden_units, activation='relu',
                                           kernel_initializer=init(2), name='ffn_inner')
    self.ffn_outer = tf.keras.layers.Dense(hidden_units, kernel_initializer=init(3), name='ffn_outer')
    self.dropout = tf.keras.layers.Dropout(dropout)

  def call(self, x, attention_mask, training=False):
    q = self.attention_norm(x)
    x = q + self.attention(q, x, x, attention_mask=attention_mask, training=training)
    y = self.ffn_norm(x)
    h = self.dropout(self.ffn_inner(y), training=training)
    return y + self.dropout(self.ffn_outer(h), training=training)


class SASRec(tf.keras.Model):
  """Maps item windows `int32 [B, maxlen]` (0 = padding) to hidden states `[B, maxlen, d]`.

  `item_embedding` rows are items 1..num_items (row 0 is padding and never a
  candidate); `score_candidates` and `score_all` rank with the hidden state
  at the last position.
  """

  def __init__(self, num_items: int, *, maxlen: int = 200, hidden_units: int = 50,
               num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2,
               positional: bool = True, item_features: Optional[np.ndarray] = None,
               seed: int = 0, name: str = 'sasrec'):
    super().__init__(name=name)
    for what, value in (('num_items', num_items), ('maxlen', maxlen),
                        ('hidden_units', hidden_units), ('num_blocks', num_blocks),
                        ('num_heads', num_heads)):
      if value < 1:
        raise ValueError(f'sasrec: {what} must be >= 1, got {value}')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'sasrec: dropout must be in [0, 1), got {dropout}')
    self.num_items = num_items
    self.maxlen = maxlen
    self.hidden_units = hidden_units
    self.positional = positional
    # With item features (e.g. language-model text embeddings), an item's vector is
    # `item_embedding[i] + features[i] @ W`: the free rows start at zero, so an item
    # that is never trained on (a cold item) is represented by its text alone.
    self.feature_dim = None
    if item_features is not None:
      item_features = np.asarray(item_features, np.float32)
      if item_features.ndim != 2 or item_features.shape[0] != num_items + 1:
        raise ValueError(f'sasrec: item_features has shape {item_features.shape}, expected '
                         f'[{num_items + 1}, F] (row 0 is padding)')
      if not np.all(np.isfinite(item_features)):
        raise ValueError('sasrec: item_features has non-finite values')
      self.feature_dim = item_features.shape[1]
      self.item_features = tf.Variable(item_features, trainable=False, name='item_features')
      self.feature_projection = tf.keras.layers.Dense(
          hidden_units, use_bias=False, name='feature_projection',
          kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 99))
    self.item_embedding = tf.keras.layers.Embedding(
        num_items + 1, hidden_units,
        embeddings_initializer=('zeros' if item_features is not None else
                                tf.keras.initializers.GlorotUniform(seed=seed)),
        name='item_embedding')
    self.position_embedding = tf.keras.layers.Embedding(
        maxlen, hidden_units, embeddings_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1),
        name='position_embedding') if positional else None
    self.input_dropout = tf.keras.layers.Dropout(dropout)
    self.blocks = [SelfAttentionBlock(hidden_units, num_heads, dropout, seed=seed + 2 + i,
                                      name=f'block_{i}') for i in range(num_blocks)]
    self.final_norm = tf.keras.layers.LayerNormalization(epsilon=_LN_EPSILON, name='final_norm')

  def item_vectors(self, items):
    """The vectors `[..., d]` of item ids (the rows candidates are scored with)."""
    vectors = self.item_embedding(items)
    if self.feature_dim is not None:
      vectors += self.feature_projection(tf.gather(self.item_features, items))
    return vectors

  def item_table(self):
    """Every item's vector, `[num_items + 1, d]` (row 0 is padding)."""
    table = tf.convert_to_tensor(self.item_embedding.embeddings)
    if self.feature_dim is not None:
      table = table + self.feature_projection(self.item_features)
    return table

  def call(self, seq, training=False):
    seq = tf.convert_to_tensor(seq, tf.int32)
    length = tf.shape(seq)[1]
    present = tf.not_equal(seq, 0)
    mask = tf.cast(present, tf.float32)[..., None]
    x = self.item_vectors(seq) * math.sqrt(self.hidden_units)
    if self.position_embedding is not None:
      x += self.position_embedding(tf.range(length))[None]
    x = self.input_dropout(x, training=training) * mask
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    attention_mask = tf.logical_and(causal[None], present[:, None, :])
    for block in self.blocks:
      x = block(x, attention_mask, training=training) * mask
    return self.final_norm(x)

  def last_state(self, seq, training=False):
    """The hidden state at the last window position, `[B, d]`."""
    return self(seq, training=training)[:, -1, :]

  def score_candidates(self, seq, candidates, training=False):
    """Scores `[B, C]` of candidate items `int32 [B, C]` after each window."""
    h = self.last_state(seq, training=training)
    return tf.einsum('bd,bcd->bc', h, self.item_vectors(candidates))

  def score_all(self, seq, training=False):
    """Scores `[B, num_items + 1]` of every item id (column 0 is padding)."""
    h = self.last_state(seq, training=training)
    return tf.matmul(h, self.item_table(), transpose_b=True)

  def build_for_inputs(self) -> 'SASRec':
    """Creates the variables (a call on one all-padding window)."""
    self(tf.zeros([1, self.maxlen], tf.int32))
    return self


def sequence_loss(model: SASRec, seq, positives, negatives, *, loss: str = 'bce',
                  training: bool = True) -> tf.Tensor:
  """The SASRec objective, averaged over non-padded target positions.

  Args:
    model: The model.
    seq: int32 [B, T] input windows.
    positives: int32 [B, T] the next item at each position (0 = no target).
    negatives: int32 [B, T] (bce) or [B, T, K] (sampled_softmax) sampled negatives.
    loss: 'bce' (the paper's) or 'sampled_softmax'.
    training: Dropout on.

  Returns:
    The scalar loss.
  """
  if loss not in LOSSES:
    raise ValueError(f'unknown loss {loss!r}; valid: {", ".join(LOSSES)}')
  h = model(seq, training=training)
  target = tf.cast(tf.not_equal(positives, 0), tf.float32)
  pos_logits = tf.reduce_sum(h * model.item_vectors(positives), -1)
  if loss == 'bce':
    neg_logits = tf.reduce_sum(h * model.item_vectors(negatives), -1)
    per_position = (tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(pos_logits), pos_logits) +
                    tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(neg_logits), neg_logits))
  else:
    neg_logits = tf.einsum('btd,btkd->btk', h, model.item_vectors(negatives))
    logits = tf.concat([pos_logits[..., None], neg_logits], axis=-1)
    per_position = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.zeros_like(positives), logits)
  return tf.reduce_sum(per_position * target) / tf.maximum(tf.reduce_sum(target), 1.0)


def build_sasrec(num_items: int, *, maxlen: int = 200, hidden_units: int = 50,
                 num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2,
                 positional: bool = True, seed: int = 0,
                 item_init: Optional[np.ndarray] = None,
                 item_features: Optional[np.ndarray] = None) -> SASRec:
  """Builds SASRec with its variables created.

  Args:
    num_items: Items (ids 1..num_items; 0 pads).
    maxlen: Input window (positions of the positional embedding).
    hidden_units: Embedding and hidden size d.
    num_blocks: Self-attention blocks.
    num_heads: Attention heads (must divide d).
    dropout: Dropout rate on embeddings, attention and feed-forward.
    positional: Add the learned positional embedding.
    seed: Initializer seed.
    item_init: Optional initial item table `[num_items + 1, d]` (row 0 unused).
    item_features: Optional fixed item features `[num_items + 1, F]` (row 0
      padding), e.g. text embeddings: an item's vector becomes a free row
      (starting at zero) plus a learned projection of its features.

  Returns:
    The built `SASRec`.
  """
  model = SASRec(num_items, maxlen=maxlen, hidden_units=hidden_units, num_blocks=num_blocks,
                 num_heads=num_heads, dropout=dropout, positional=positional,
                 item_features=item_features, seed=seed)
  model.build_for_inputs()
  if item_init is not None:
    item_init = np.asarray(item_init, np.float32)
    want = (num_items + 1, hidden_units)
    if item_init.shape != want:
      raise ValueError(f'item_init has shape {item_init.shape}, expected {want}')
    if not np.all(np.isfinite(item_init)):
      raise ValueError('item_init has non-finite values')
    model.item_embedding.embeddings.assign(item_init)
  return model
