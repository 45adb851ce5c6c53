"""Central SASRec training: the sampler, pessimistic ranking, and learning a sequential pattern."""

import sys
import numpy as np
import pytest

from tff_rec.data import ratings as ratings_lib
from tff_rec.data import sequences
from tff_rec.training import sequential


def _cyclic_split(users=64, items=40, length=12, seed=0):
  """Each user walks the item cycle 1, 2, ..., items from a random start: the next item is known."""
  rng = np.random.default_rng(seed)
  train, valid, test = [], np.zeros(users, np.int32), np.zeros(users, np.int32)
  vneg, tneg = np.zeros((users, 20), np.int32), np.zeros((users, 20), np.int32)
  for u in range(users):
    start = rng.integers(items)
    seq = (start + np.arange(length)) % items + 1
    train.append(seq[:-2].astype(np.int32))
    valid[u], test[u] = seq[-2], seq[-1]
    pool = np.setdiff1d(np.arange(1, items + 1), seq)
    vneg[u] = rng.choice(pool, 20, replace=False)
    tneg[u] = rng.choice(pool, 20, replace=False)
  index = ratings_lib.IdIndex(np.array([str(i) for i in range(1, items + 1)], dtype=object))
  users_index = ratings_lib.IdIndex(np.array([str(u) for u in range(users)], dtype=object))
  return sequences.SequenceSplit(train=train, valid=valid, test=test, valid_negatives=vneg,
                                 test_negatives=tneg, item_index=index, user_index=users_index,
                                 name='cyclic')


def test_sampler_shifts_targets_and_draws_negatives_outside_the_training_set():
  split = _cyclic_split()
  sampler = sequential.TrainingSampler(split, 8, seed=1)
  seq, pos, neg = sampler.batch(32)
  assert seq.shape == pos.shape == neg.shape == (32, 8)
  for s, p, n in zip(seq, pos, neg):
    real = p > 0
    np.testing.assert_array_equal(s[real][1:], p[real][:-1])  # pos is seq shifted by one
    assert (n[real] > 0).all() and (n[~real] == 0).all()
    user = next(u for u, t in enumerate(split.train) if t[-1] == p[-1] and t[-2] == s[-1])
    assert not set(n[real].tolist()) & set(split.train[user].tolist())
  sampler = sequential.TrainingSampler(split, 8, num_negatives=3, seed=1)
  assert sampler.batch(4)[2].shape == (4, 8, 3)


class _Constant:
  """A model scoring every item alike: pessimistic ranks give it no hits."""

  def score_all(self, windows):
    return np.zeros((len(windows), 41), np.float32) + 0 * windows[:, :1]


class _Oracle:

  def __init__(self, split):
    self.split = split

  def score_all(self, windows):
    out = np.zeros((len(windows), 41), np.float32)
    out[np.arange(len(windows)), windows[:, -1] % 40 + 1] = 1.0  # the next item in the cycle
    return out


class _Nan:

  def score_all(self, windows):
    return np.full((len(windows), 41), np.nan, np.float32)


def test_evaluate_is_pessimistic_on_ties_and_perfect_for_an_oracle():
  split = _cyclic_split()
  for which in ('valid', 'test'):
    zero = sequential.evaluate(_Constant(), split, which=which, maxlen=8)
    assert zero['hr@10'] == 0.0 and zero['full_hr@10'] == 0.0
    best = sequential.evaluate(_Oracle(split), split, which=which, maxlen=8)
    assert best['hr@10'] == best['full_hr@10'] == best['ndcg@10'] == best['full_ndcg@10'] == 1.0
    assert best['users'] == 64
  with pytest.raises(FloatingPointError, match='non-finite'):
    sequential.evaluate(_Nan(), split, which='test', maxlen=8)


def test_full_ranking_excludes_the_history():
  split = _cyclic_split()

  class HistoryLover:

    def score_all(self, windows):
      out = np.zeros((len(windows), 41), np.float32)
      rows = np.repeat(np.arange(len(windows)), windows.shape[1])
      out[rows, windows.ravel()] = 5.0  # history items outscore the target, but are excluded
      out[np.arange(len(windows)), windows[:, -1] % 40 + 1] = 1.0
      out[:, 0] = 9.0  # padding id: never a candidate
      return out

  r = sequential.evaluate(HistoryLover(), split, which='test', maxlen=10)
  assert r['full_hr@10'] == 1.0 and r['full_ndcg@10'] == 1.0


def test_sasrec_learns_the_cycle():
  split = _cyclic_split(users=128)
  config = sequential.SequentialConfig(
      hparams=dict(maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout=0.0),
      learning_rate=0.01, batch_size=32, epochs=30, eval_every=10, progress_bar=False, seed=0)
  rows = []
  result = sequential.train(config, split, on_eval=rows.append)
  assert [r['epoch'] for r in rows] == [10, 20, 30] == [r['epoch'] for r in result.history]
  assert result.valid['hr@10'] == max(r['valid/hr@10'] for r in rows)
  # 21 candidates: chance HR@10 is about 0.48; the next item of the cycle is learned.
  assert result.test['hr@10'] > 0.9 and result.test['ndcg@10'] > 0.6
  assert result.test['full_hr@10'] > 0.5
  assert result.num_parameters > 0 and result.seconds_per_epoch > 0
  again = sequential.evaluate(result.model, split, which='test', maxlen=8)
  assert again['hr@10'] == pytest.approx(result.test['hr@10'])  # the best weights are restored


def test_sampled_softmax_trains_too():
  split = _cyclic_split(users=64)
  config = sequential.SequentialConfig(
      hparams=dict(maxlen=8, hidden_units=16, num_blocks=1, num_heads=1, dropout=0.0),
      loss='sampled_softmax', num_negatives=5, learning_rate=0.01, batch_size=32, epochs=20,
      eval_every=20, progress_bar=False)
  assert sequential.train(config, split).test['hr@10'] > 0.8


def test_config_errors():
  with pytest.raises(ValueError, match='unknown loss'):
    sequential.SequentialConfig(loss='hinge')
  with pytest.raises(ValueError, match='exactly one negative'):
    sequential.SequentialConfig(num_negatives=3)
  with pytest.raises(ValueError, match='epochs'):
    sequential.SequentialConfig(epochs=0)
  assert 'progress_bar' not in sequential.config_dict(sequential.SequentialConfig())



def test_principal_init_is_a_fixed_projection_at_the_glorot_scale():
  rng = np.random.default_rng(0)
  features = np.concatenate([np.zeros((1, 12)), rng.normal(size=(40, 12))]).astype(np.float32)
  table = sequential.principal_init(features, 4)
  assert table.shape == (41, 4) and not table[0].any()
  assert table[1:].std() == pytest.approx(np.sqrt(2.0 / 45), rel=1e-4)
  # The leading components: variance decreases column by column.
  variances = table[1:].var(axis=0)
  assert np.all(np.diff(variances) <= 1e-9)
  with pytest.raises(ValueError, match='principal components'):
    sequential.principal_init(features, 13)


def test_item_text_modes_use_the_features():
  split = _cyclic_split(users=16)
  features = np.random.default_rng(1).normal(size=(41, 8)).astype(np.float32)
  hp = dict(maxlen=8, hidden_units=4, num_blocks=1, num_heads=1, dropout=0.0)
  init = sequential.build_model(sequential.SequentialConfig(hparams=hp, item_text='init'), split,
                                item_text_features=features)
  np.testing.assert_allclose(init.item_embedding.embeddings.numpy(),
                             sequential.principal_init(features, 4), atol=1e-6)
  model = sequential.build_model(sequential.SequentialConfig(hparams=hp, item_text='input'), split,
                                 item_text_features=features)
  assert model.feature_dim == 8
  with pytest.raises(ValueError, match='needs the items'):
    sequential.build_model(sequential.SequentialConfig(hparams=hp, item_text='input'), split)
  with pytest.raises(ValueError, match='expected 41'):
    sequential.build_model(sequential.SequentialConfig(hparams=hp, item_text='input'), split,
                           item_text_features=features[:5])
  with pytest.raises(ValueError, match='unknown item_text'):
    sequential.SequentialConfig(item_text='bert')



def test_cold_items_are_never_negatives_and_are_reported_apart():
  split = sequences.hold_out_items(_cyclic_split(users=64), fraction=0.2, seed=0)
  sampler = sequential.TrainingSampler(split, 8, num_negatives=4, seed=0)
  for _ in range(20):
    _, _, neg = sampler.batch(32)
    assert not np.isin(neg, split.cold_items).any()
  config = sequential.SequentialConfig(
      hparams=dict(maxlen=8, hidden_units=8, num_blocks=1, num_heads=1, dropout=0.0),
      batch_size=32, epochs=2, eval_every=2, progress_bar=False)
  result = sequential.train(config, split)
  assert result.test_cold['users'] + result.test_warm['users'] == result.test['users']
  assert result.test_cold['users'] == split.users_by_test_item(cold=True).size > 0



def test_evaluation_reuses_one_traced_scorer():
  # Eager Keras calls kept each batch's attention intermediates alive (2 GB per ML-1M
  # evaluation); evaluation goes through one traced function per model instead.
  split = _cyclic_split(users=40)
  config = sequential.SequentialConfig(
      hparams=dict(maxlen=8, hidden_units=8, num_blocks=1, num_heads=1, dropout=0.0))
  model = sequential.build_model(config, split)
  for which in ('valid', 'test', 'test'):
    sequential.evaluate(model, split, which=which, maxlen=8, batch_size=16)
  assert sequential._SCORERS[model].experimental_get_tracing_count() == 1  # pylint: disable=protected-access


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
