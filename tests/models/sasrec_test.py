"""SASRec: the causal mask, padding, scoring and the two objectives."""

import sys
import numpy as np
import pytest
import tensorflow as tf

from tff_rec.models import registry
from tff_rec.models import sasrec


def _model(**kw):
  args = dict(maxlen=8, hidden_units=16, num_blocks=2, num_heads=2, dropout=0.0, seed=1)
  args.update(kw)
  return registry.build_sequential_model('sasrec', 30, **args)


def test_a_change_at_position_t_leaves_earlier_outputs_unchanged():
  model = _model()
  seq = np.array([[0, 0, 3, 7, 9, 2, 5, 11]], np.int32)
  before = model(seq).numpy()
  for t in range(2, 8):
    changed = seq.copy()
    changed[0, t] = 20 + t
    after = model(changed).numpy()
    np.testing.assert_allclose(after[0, :t], before[0, :t], atol=1e-5)
    assert np.abs(after[0, t:] - before[0, t:]).max() > 1e-4, t


def test_padded_positions_do_not_influence_the_items_after_them():
  model = _model()
  # Padding ids are masked as keys: only the real items (and their positions) matter.
  a = model(np.array([[0, 0, 0, 4, 5, 6, 7, 8]], np.int32)).numpy()
  embedding = model.item_embedding.embeddings
  embedding.assign(tf.tensor_scatter_nd_update(embedding, [[0]], [tf.fill([16], 9.0)]))
  b = model(np.array([[0, 0, 0, 4, 5, 6, 7, 8]], np.int32)).numpy()
  np.testing.assert_allclose(a[0, 3:], b[0, 3:], atol=1e-5)


def test_positional_embedding_ablation_makes_the_model_order_blind_at_the_last_step():
  no_pos = _model(positional=False, num_blocks=1)
  a = no_pos.last_state(np.array([[0, 0, 1, 2, 3, 4, 5, 6]], np.int32)).numpy()
  b = no_pos.last_state(np.array([[0, 0, 2, 1, 4, 3, 5, 6]], np.int32)).numpy()
  np.testing.assert_allclose(a, b, atol=1e-5)  # same set before the last item, same last item
  with_pos = _model(num_blocks=1)
  a = with_pos.last_state(np.array([[0, 0, 1, 2, 3, 4, 5, 6]], np.int32)).numpy()
  b = with_pos.last_state(np.array([[0, 0, 2, 1, 4, 3, 5, 6]], np.int32)).numpy()
  assert np.abs(a - b).max() > 1e-4
  assert not any('position' in v.name for v in no_pos.trainable_variables)


def test_candidate_scores_agree_with_full_scores():
  model = _model()
  seq = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 9, 8, 7]], np.int32)
  cands = np.array([[3, 10, 29], [1, 2, 4]], np.int32)
  full = model.score_all(seq).numpy()
  assert full.shape == (2, 31)
  np.testing.assert_allclose(model.score_candidates(seq, cands).numpy(),
                             np.take_along_axis(full, cands, axis=1), rtol=1e-5, atol=1e-5)


def test_bce_loss_matches_a_hand_computation_and_ignores_padded_targets():
  model = _model()
  seq = np.array([[0, 0, 0, 0, 1, 2, 3, 4]], np.int32)
  pos = np.array([[0, 0, 0, 0, 2, 3, 4, 5]], np.int32)
  neg = np.array([[0, 0, 0, 0, 9, 8, 7, 6]], np.int32)
  loss = float(sasrec.sequence_loss(model, seq, pos, neg, training=False))
  h = model(seq).numpy()[0]
  table = model.item_embedding.embeddings.numpy()
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # pylint: disable=unnecessary-lambda-assignment
  want = np.mean([-np.log(sig(h[t] @ table[pos[0, t]])) - np.log(1.0 - sig(h[t] @ table[neg[0, t]]))
                  for t in range(4, 8)])
  assert loss == pytest.approx(want, rel=1e-5)
  other = neg.copy()
  other[0, :4] = [11, 12, 13, 14]  # negatives at padded targets do not count
  assert float(sasrec.sequence_loss(model, seq, pos, other, training=False)) == pytest.approx(loss)


def test_sampled_softmax_loss():
  model = _model()
  seq = np.array([[0, 0, 0, 0, 1, 2, 3, 4]], np.int32)
  pos = np.array([[0, 0, 0, 0, 2, 3, 4, 5]], np.int32)
  neg = np.tile(np.arange(10, 13, dtype=np.int32), (1, 8, 1))
  loss = float(sasrec.sequence_loss(model, seq, pos, neg, loss='sampled_softmax', training=False))
  h = model(seq).numpy()[0]
  table = model.item_embedding.embeddings.numpy()
  want = []
  for t in range(4, 8):
    logits = np.array([h[t] @ table[pos[0, t]]] + [h[t] @ table[k] for k in (10, 11, 12)])
    want.append(-logits[0] + np.log(np.exp(logits).sum()))
  assert loss == pytest.approx(np.mean(want), rel=1e-5)
  with pytest.raises(ValueError, match='unknown loss'):
    sasrec.sequence_loss(model, seq, pos, neg, loss='hinge')


def test_item_init_and_bad_arguments():
  table = np.random.default_rng(0).normal(size=(31, 16)).astype(np.float32)
  model = _model(item_init=table)
  np.testing.assert_array_equal(model.item_embedding.embeddings.numpy(), table)
  with pytest.raises(ValueError, match='expected'):
    _model(item_init=table[:, :8])
  with pytest.raises(ValueError, match='non-finite'):
    _model(item_init=np.full((31, 16), np.nan, np.float32))
  with pytest.raises(ValueError, match='divisible'):
    _model(num_heads=3)
  with pytest.raises(ValueError, match='no hyperparameter'):
    registry.build_sequential_model('sasrec', 30, factors=8)
  with pytest.raises(ValueError, match='unknown sequential model'):
    registry.build_sequential_model('bert4rec', 30)
  assert 'maxlen' in registry.sequential_hparam_names('sasrec')



def test_item_features_represent_items_that_were_never_trained():
  features = np.random.default_rng(0).normal(size=(31, 12)).astype(np.float32)
  features[0] = 0.0
  model = _model(item_features=features)
  # Free rows start at zero: an item's vector is its projected features.
  projection = model.feature_projection.kernel.numpy()
  np.testing.assert_allclose(model.item_table().numpy(), features @ projection, atol=1e-5)
  seq = np.array([[0, 0, 1, 2, 3, 4, 5, 6]], np.int32)
  np.testing.assert_allclose(model.score_candidates(seq, np.array([[7, 8]])).numpy(),
                             model.score_all(seq).numpy()[:, [7, 8]], rtol=1e-5, atol=1e-5)
  trainable = {v.name.split('/')[-1].split(':')[0] for v in model.trainable_variables}
  assert 'item_features' not in trainable and 'kernel' in trainable
  with pytest.raises(ValueError, match='item_features has shape'):
    _model(item_features=features[1:])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
