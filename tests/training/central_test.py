"""Central baselines: training, evaluation, saved final model."""

import sys
import numpy as np
import pytest

from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.models import predictions
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import experiment
from tff_rec.training import optimizers


@pytest.fixture(scope='module')
def split():
  r = synthetic.synthetic_ratings(num_users=60, num_items=20, rank=2, noise_std=0.2,
                                  mean_ratings_per_user=16, seed=2).ratings
  return splits.split_random(r, fractions=(0.9, 0.0, 0.1), seed=0)


def test_central_mf_learns_and_saves(split, tmp_path):
  config = central.CentralConfig(
      model=experiment.ModelConfig('mf', {'embedding_dim': 2, 'init_stddev': 0.3}),
      optimizer=optimizers.OptimizerConfig('adam', 0.05), epochs=15, batch_size=16,
      root_output_dir=str(tmp_path), experiment_name='c', progress_bar=False)
  result = central.run_central(config, split=split)
  baseline = np.sqrt(np.mean((split.test.ratings - split.train.global_mean()) ** 2))
  assert result.test_metrics['rmse'] < 0.85 * baseline
  assert len(result.history) == 15
  rec, model_config, users, items = artifacts.load_final_model(result.run_dir)
  assert model_config['algorithm'] == 'central' and len(users) == split.train.num_users
  np.testing.assert_allclose(
      predictions.predict(rec.keras_model, split.test.users, split.test.items),
      predictions.predict(result.model, split.test.users, split.test.items), atol=1e-6)


def test_central_implicit_model_reports_hit_rate(tmp_path):
  r = synthetic.synthetic_ratings(num_users=50, num_items=60, mean_ratings_per_user=8,
                                  activity_skew=0.3, seed=4).ratings
  split = splits.split_leave_one_out(r, num_negatives=20, seed=0)
  config = central.CentralConfig(
      model=experiment.ModelConfig('gmf', {'factors': 4}), epochs=2, batch_size=64, top_k=5,
      root_output_dir=str(tmp_path), experiment_name='g', progress_bar=False)
  result = central.run_central(config, split=split)
  assert 0.0 <= result.test_metrics['hr@5'] <= 1.0
  assert 0.0 <= result.test_metrics['ndcg@5'] <= result.test_metrics['hr@5']


def test_heldout_users_are_refused(tmp_path):
  r = synthetic.synthetic_ratings(num_users=30, num_items=20, seed=1).ratings
  config = central.CentralConfig(root_output_dir=str(tmp_path), progress_bar=False)
  with pytest.raises(ValueError, match='seen in training'):
    central.run_central(config, split=splits.split_by_user(r, seed=0))


def test_load_final_model_errors(tmp_path):
  with pytest.raises(artifacts.RunOutputError, match='no such training run'):
    artifacts.load_final_model(str(tmp_path / 'missing'))
  (tmp_path / 'unfinished').mkdir()
  with pytest.raises(artifacts.RunOutputError, match='did not finish'):
    artifacts.load_final_model(str(tmp_path / 'unfinished'))


def test_synthetic_dataset_config():
  split = data_setup.load_split(data_setup.DataConfig(dataset='synthetic', split='by_user',
                                                      val_fraction=0.1, test_fraction=0.1))
  assert split.heldout_users
  assert split.train.num_users == data_setup.SYNTHETIC_SHAPE['num_users']


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
