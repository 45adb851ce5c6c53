"""The federated view: one client per user, OrderedDict elements, built from ids."""

import sys
import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from tff_rec.data import federated
from tff_rec.data import ratings as ratings_lib
from tff_rec.data import synthetic


@pytest.fixture(scope='module')
def ratings():
  return synthetic.synthetic_ratings(num_users=20, num_items=30, mean_ratings_per_user=8, seed=1).ratings


def _rows(ds):
  out = []
  for batch in ds:
    assert isinstance(batch, collections.OrderedDict)
    assert isinstance(batch['x'], collections.OrderedDict)
    for u, i, y in zip(batch['x']['user'].numpy(), batch['x']['item'].numpy(), batch['y'].numpy()):
      out.append((int(u), int(i), float(y)))
  return out


def test_one_client_per_user_with_its_own_ratings(ratings):
  cd = federated.client_data(ratings, federated.ClientDatasetConfig(batch_size=4, shuffle=False))
  assert sorted(cd.client_ids, key=int) == [str(u) for u in ratings.present_users()]
  for cid in cd.client_ids[:5]:
    u = int(cid)
    rows = _rows(cd.create_tf_dataset_for_client(cid))
    mine = ratings.select(ratings.users == u)
    assert sorted((i, y) for _, i, y in rows) == sorted(zip(mine.items.tolist(), mine.ratings.tolist()))
    assert {r[0] for r in rows} == {u}


def test_element_spec_and_batching(ratings):
  cd = federated.client_data(ratings, federated.ClientDatasetConfig(batch_size=3))
  ds = cd.create_tf_dataset_for_client(cd.client_ids[0])
  assert ds.element_spec == federated.element_spec()
  sizes = [int(b['y'].shape[0]) for b in ds]
  assert all(s <= 3 for s in sizes)


def test_dataset_computation_builds_datasets_from_ids(ratings, tff_context):
  del tff_context
  cd = federated.client_data(ratings, federated.ClientDatasetConfig(batch_size=4))
  comp = cd.dataset_computation
  assert str(comp.type_signature.parameter) == 'str'
  ds = comp(cd.client_ids[0])
  assert len(_rows(ds)) == int(np.sum(ratings.users == int(cd.client_ids[0])))


def test_shuffle_is_seeded_and_changes_with_round(ratings):
  cfg = federated.ClientDatasetConfig(batch_size=100, seed=5)
  fn = federated.make_dataset_fn(ratings, cfg)
  u = int(ratings.present_users()[0])
  first = _rows(fn(tf.constant(federated.client_id(u, 1))))
  again = _rows(fn(tf.constant(federated.client_id(u, 1))))
  other_round = _rows(fn(tf.constant(federated.client_id(u, 2))))
  assert first == again
  assert sorted(first) == sorted(other_round)
  assert first != other_round


def test_epochs_and_max_examples_keep_latest(ratings):
  u = int(np.bincount(ratings.users).argmax())
  mine = ratings.select(ratings.users == u).sorted_by_user()
  cfg = federated.ClientDatasetConfig(batch_size=1000, num_epochs=2, max_examples_per_user=3, shuffle=False)
  rows = _rows(federated.make_dataset_fn(ratings, cfg)(tf.constant(str(u))))
  assert len(rows) == 6
  latest = set(mine.items[-3:].tolist())
  assert {i for _, i, _ in rows} == latest


def test_negatives_are_unrated_items(ratings):
  counts = np.bincount(ratings.users, minlength=ratings.num_users)
  u = int(np.flatnonzero((counts > 0) & (counts < ratings.num_items // 4))[0])
  rated = set(ratings.items[ratings.users == u].tolist())
  cfg = federated.ClientDatasetConfig(batch_size=1000, negatives_per_positive=3)
  rows = _rows(federated.make_dataset_fn(ratings, cfg)(tf.constant(str(u))))
  pos = [r for r in rows if r[2] == 1.0]
  neg = [r for r in rows if r[2] == 0.0]
  assert len(pos) == len(rated) and len(neg) == 3 * len(rated)
  assert not {i for _, i, _ in neg} & rated


def test_eval_dataset_marks_query_rows(ratings):
  train = ratings.select(np.arange(len(ratings)) % 2 == 0)
  test = ratings.select(np.arange(len(ratings)) % 2 == 1)
  u = int(test.present_users()[0])
  ds = federated.make_eval_dataset_fn(train, test, batch_size=4)(tf.constant(str(u)))
  assert ds.element_spec == federated.eval_element_spec()
  flags = np.concatenate([b['x']['query'].numpy() for b in ds])
  assert flags.sum() == np.sum(test.users == u)
  assert (~flags).sum() == np.sum(train.users == u)
  stripped = federated.strip_query(next(iter(ds)))
  assert list(stripped['x'].keys()) == ['user', 'item']


@pytest.mark.parametrize('kwargs', [dict(batch_size=0), dict(num_epochs=0), dict(max_examples_per_user=0),
                                    dict(negatives_per_positive=-1)])
def test_invalid_config(kwargs):
  with pytest.raises(ValueError):
    federated.ClientDatasetConfig(**kwargs)


def test_no_users_is_an_error(ratings):
  with pytest.raises(ValueError, match='no users'):
    federated.client_data(ratings.select(np.zeros(len(ratings), bool)))


def test_user_who_rated_everything_gets_no_negatives(ratings):
  counts = np.bincount(ratings.users, minlength=ratings.num_users)
  full = np.flatnonzero(counts == ratings.num_items)
  assert len(full), 'fixture should contain a user who rated every item'
  cfg = federated.ClientDatasetConfig(batch_size=1000, negatives_per_positive=2)
  rows = _rows(federated.make_dataset_fn(ratings, cfg)(tf.constant(str(int(full[0])))))
  assert len(rows) == ratings.num_items and all(r[2] == 1.0 for r in rows)


@pytest.mark.parametrize('cfg', [
    federated.ClientDatasetConfig(batch_size=3, seed=4),
    federated.ClientDatasetConfig(batch_size=5, num_epochs=2, max_examples_per_user=4,
                                  negatives_per_positive=2),
])
def test_per_user_files_give_the_same_datasets(ratings, cfg, tmp_path):
  in_graph = federated.make_dataset_fn(ratings, cfg)
  from_files = federated.make_dataset_fn(ratings, cfg, storage_dir=str(tmp_path))
  for u in ratings.present_users():
    for cid in (federated.client_id(u), federated.client_id(u, 3)):
      a = list(in_graph(tf.constant(cid)))
      b = list(from_files(tf.constant(cid)))
      assert len(a) == len(b)
      for x, y in zip(a, b):
        tf.nest.map_structure(lambda s, t: np.testing.assert_array_equal(s.numpy(), t.numpy()), x, y)


def test_user_shards_are_written_once_per_content(ratings, tmp_path):
  first = federated.write_user_shards(ratings.sorted_by_user(), str(tmp_path))
  assert federated.write_user_shards(ratings.sorted_by_user(), str(tmp_path)) == first
  assert len(os.listdir(first)) == ratings.num_users
  other = federated.write_user_shards(ratings.select(ratings.users != 0).sorted_by_user(), str(tmp_path))
  assert other != first
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(first), os.path.basename(other)])


def test_client_data_from_files_builds_datasets_worker_side(ratings, tff_context, tmp_path):
  del tff_context
  cd = federated.client_data(ratings, federated.ClientDatasetConfig(batch_size=4),
                             storage_dir=str(tmp_path))
  ds = cd.dataset_computation(cd.client_ids[0])
  assert len(_rows(ds)) == int(np.sum(ratings.users == int(cd.client_ids[0])))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
