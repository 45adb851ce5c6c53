"""experiment.run_federated with implicit models (negatives_per_positive, HR/NDCG)."""

import sys
import dataclasses

import pytest

from tff_rec.data import splits
from tff_rec.data import synthetic
from tff_rec.training import algorithms
from tff_rec.training import execution
from tff_rec.training import experiment


def _split():
  r = synthetic.synthetic_ratings(num_users=30, num_items=60, mean_ratings_per_user=8,
                                  seed=2).ratings
  return splits.split_leave_one_out(r, num_negatives=20, seed=0)


def _config(tmp_path, algorithm='fedavg', model='gmf', negatives=2):  # pylint: disable=unused-argument
  return experiment.FederatedConfig(
      model=experiment.ModelConfig(model, dict(factors=4) if model == 'gmf' else {}),
      algorithm=algorithms.AlgorithmConfig(name=algorithm),
      clients_per_round=10, total_rounds=2, eval_every=1, batch_size=8,
      negatives_per_positive=negatives)


def _execution(tmp_path, algorithm='fedavg'):
  return execution.ExecutionConfig(root_output_dir=str(tmp_path), experiment_name=algorithm,
                                   progress_bar=False)


def test_fedavg_reports_ranking_metrics(tff_context, tmp_path):
  split = _split()
  result = experiment.run_federated(_config(tmp_path), _execution(tmp_path), split=split)
  assert set(result.test_metrics) == {'hr@10', 'ndcg@10', 'num_users'}
  assert 0.0 <= result.test_metrics['ndcg@10'] <= result.test_metrics['hr@10'] <= 1.0
  assert result.test_metrics['num_users'] == split.test.num_ratings


def test_fedrecon_trains_and_leaves_ranking_to_reconstruction(tff_context, tmp_path):
  result = experiment.run_federated(_config(tmp_path, 'fedrecon'), _execution(tmp_path, 'fedrecon'),
                                    split=_split())
  assert result.test_metrics == {}


def test_implicit_needs_negatives_and_rating_models_refuse_them(tmp_path):
  with pytest.raises(ValueError, match='negatives_per_positive > 0'):
    experiment.run_federated(_config(tmp_path, negatives=0), _execution(tmp_path), split=_split())
  with pytest.raises(ValueError, match='implicit models only'):
    experiment.run_federated(_config(tmp_path, model='mf'), _execution(tmp_path), split=_split())
  with pytest.raises(ValueError, match='negatives_per_positive must be >= 0'):
    dataclasses.replace(_config(tmp_path), negatives_per_positive=-1)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
