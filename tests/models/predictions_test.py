"""The one rating-prediction / rating-metrics module and its clipping rule."""

import ast
import glob
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import predictions

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rating_metrics_by_hand_and_unclipped():
  m = predictions.rating_metrics(np.array([0.0, 3.4, 6.0]), np.array([1.0, 3.0, 4.0]))
  # No clipping (a 1-5 scale would have made the errors 0, 0.4, 1): errors -1, 0.4, 2.
  np.testing.assert_allclose(m['mse'], (1 + 0.16 + 4) / 3, rtol=1e-9)
  np.testing.assert_allclose(m['rmse'], np.sqrt((1 + 0.16 + 4) / 3), rtol=1e-9)
  np.testing.assert_allclose(m['mae'], 3.4 / 3, rtol=1e-9)
  assert m['rating_accuracy'] == pytest.approx(1 / 3)
  assert m['num_examples'] == 3


@pytest.mark.parametrize('bad, match', [
    ((np.array([1.0, np.nan]), np.array([1.0, 2.0])), 'not finite'),
    ((np.array([1.0, np.inf]), np.array([1.0, 2.0])), 'not finite'),
    ((np.array([1.0]), np.array([1.0, 2.0])), '1 predictions for 2 ratings'),
    ((np.zeros(0), np.zeros(0)), 'no examples'),
])
def test_rating_metrics_refuse_what_would_be_silently_wrong(bad, match):
  with pytest.raises(ValueError, match=match):
    predictions.rating_metrics(*bad)


def test_predict_batches_equal_one_call():
  users = tf.keras.Input([], dtype=tf.int32, name='user')
  items = tf.keras.Input([], dtype=tf.int32, name='item')
  out = tf.cast(users, tf.float32) * 10.0 + tf.cast(items, tf.float32)
  model = tf.keras.Model({'user': users, 'item': items}, out)
  u, i = np.arange(7), np.arange(7)[::-1]
  np.testing.assert_allclose(predictions.predict(model, u, i, batch_size=3), u * 10.0 + i)
  assert predictions.predict(model, u[:0], i[:0]).shape == (0,)
  with pytest.raises(ValueError, match='same shape'):
    predictions.predict(model, u, i[:3])


def test_clip_to_scale_is_the_served_rule():
  np.testing.assert_allclose(predictions.clip_to_scale(tf.constant([0.2, 3.0, 7.0]), (1, 5)).numpy(),
                             [1.0, 3.0, 5.0])
  with pytest.raises(ValueError, match='low <= high'):
    predictions.clip_to_scale(tf.constant([1.0]), (5, 1))


def _defined_functions(path):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_no_other_module_has_its_own_rating_metrics_or_clip():
  """One copy: a second `rating_metrics` (or a `np.clip`/`clip_by_value` of predictions) is a fork."""
  own = os.path.join(_REPO, 'tff_rec', 'models', 'predictions.py')
  offenders = []
  for package in ('tff_rec', 'privacy', 'compression', 'experiments', 'benchmarks'):
    for path in glob.glob(os.path.join(_REPO, package, '**', '*.py'), recursive=True):
      if os.path.abspath(path) == own:
        continue
      names = _defined_functions(path)
      offenders += [f'{os.path.relpath(path, _REPO)}: def {n}' for n in names
                    if n.lstrip('_') in ('rating_metrics', 'clip_to_scale')]
      with open(path) as f:
        for lineno, line in enumerate(f, 1):
          if 'rating_scale' in line and ('np.clip' in line or 'clip_by_value' in line):
            offenders.append(f'{os.path.relpath(path, _REPO)}:{lineno}: {line.strip()}')
          if 'sqrt(np.mean(' in line or 'np.mean(np.abs(' in line:  # an inline RMSE / MAE
            offenders.append(f'{os.path.relpath(path, _REPO)}:{lineno}: {line.strip()}')
  assert not offenders, offenders


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
