"""Biased matrix factorization: r(u, i) = mu + b_u + b_i + <p_u, q_i>."""

from __future__ import annotations

import tensorflow as tf

from tff_rec.models import base


class GlobalBias(tf.keras.layers.Layer):
  """A learned scalar added to every prediction (the global mean)."""

  def __init__(self, initial_value: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.initial_value = float(initial_value)

  def build(self, input_shape):
    self.bias = self.add_weight(
        name='bias', shape=(), trainable=True,
        initializer=tf.keras.initializers.Constant(self.initial_value),
    )
    super().build(input_shape)

  def call(self, x):
    return x + self.bias

  def get_config(self):
    config = super().get_config()
    config.update(initial_value=self.initial_value)
    return config


def build_mf(
    num_users: int,
    num_items: int,
    *,
    embedding_dim: int = 32,
    use_biases: bool = True,
    l2: float = 0.0,
    global_mean: float = 0.0,
    personal: bool = False,
    init_stddev: float = 0.01,
    seed: int = 0,
) -> base.RecModel:
  """Biased matrix factorization: `global_mean + b_u + b_i + <p_u, q_i>`.

  Args:
    num_users: Rows of the user table (ignored with `personal`).
    num_items: Rows of the item table.
    embedding_dim: Latent factors.
    use_biases: Add the global mean and the user and item biases (False: a
      plain dot product, as TFF's FedRecon tutorial).
    l2: L2 on the looked-up embedding and bias rows (the reconstruction ridge).
    global_mean: Initial value of the global bias (e.g. the training mean).
    personal: Keep one local user row instead of a table: the on-device user
      of Federated Reconstruction.
    init_stddev: Stddev of the normal initializer of both tables.
    seed: Initializer seed (the item table uses `seed + 1`).

  Returns:
    A `base.RecModel`; with `personal` the user row and bias are its local
    part, otherwise every layer is global.
  """
  inputs = base.model_inputs()
  user_rows = 1 if personal else num_users
  user_index = base.PersonalIndex(name='personal_index')(inputs['user']) if personal else inputs['user']
  user_emb = base.EmbeddingLookup(
      user_rows, embedding_dim, l2=l2, name='user_embedding',
      initializer=tf.keras.initializers.RandomNormal(stddev=init_stddev, seed=seed))
  item_emb = base.EmbeddingLookup(
      num_items, embedding_dim, l2=l2, name='item_embedding',
      initializer=tf.keras.initializers.RandomNormal(stddev=init_stddev, seed=seed + 1))
  p = user_emb(user_index)
  q = item_emb(inputs['item'])
  score = tf.keras.layers.Dot(axes=1, name='dot')([p, q])
  score = base.DropLastAxis(name='flatten')(score)
  local_layers = [user_emb]
  global_layers = [item_emb]
  emb_names = ['item_embedding']
  if use_biases:
    user_bias = base.EmbeddingLookup(user_rows, 1, l2=l2, initializer='zeros', name='user_bias')
    item_bias = base.EmbeddingLookup(num_items, 1, l2=l2, initializer='zeros', name='item_bias')
    bu = base.DropLastAxis(name='user_bias_flat')(user_bias(user_index))
    bi = base.DropLastAxis(name='item_bias_flat')(item_bias(inputs['item']))
    score = tf.keras.layers.Add(name='add_biases')([score, bu, bi])
    mean = GlobalBias(global_mean, name='global_bias')
    score = mean(score)
    local_layers.append(user_bias)
    global_layers += [item_bias, mean]
    emb_names.append('item_bias')
  if not personal:
    # In the plain (FedAvg) variant every variable is shared; user rows are
    # still rows of an embedding table, updated only by their own client.
    global_layers = local_layers + global_layers
    emb_names = ['user_embedding', 'user_bias'][: len(local_layers)] + emb_names
    local_layers = []
  model = tf.keras.Model(inputs=inputs, outputs=score, name='biased_mf')
  return base.RecModel(
      keras_model=model,
      global_layers=global_layers,
      local_layers=local_layers,
      task=base.TASK_RATING,
      personal=personal,
      embedding_variable_names=tuple(emb_names),
      affine_in_local=True,
  )
