"""Small real training runs (central MF, FedRecon MF, untrained NeuMF) shared by the export tests.

Each run is made once per test session (cached by name) under a session
temporary directory, on the synthetic data set, so `load_run_split` can
rebuild its split from hparams.json.
"""

import os

from tff_rec.data import synthetic
from tff_rec.models import registry
from tff_rec.training import algorithms
from tff_rec.training import artifacts
from tff_rec.training import central
from tff_rec.training import data_setup
from tff_rec.training import execution
from tff_rec.training import experiment
from tff_rec.training import optimizers

_RUNS = {}


def synthetic_data(**kwargs) -> data_setup.DataConfig:
  return data_setup.DataConfig(dataset='synthetic', seed=0, **kwargs)


def central_mf(root: str, epochs: int = 15) -> str:
  """Biased MF trained centrally (dim 8) on the synthetic ratings."""
  if 'central_mf' not in _RUNS:
    config = central.CentralConfig(
        data=synthetic_data(), model=experiment.ModelConfig('mf', {'embedding_dim': 8}),
        optimizer=optimizers.OptimizerConfig('adam', 0.01), epochs=epochs, batch_size=64,
        root_output_dir=root, experiment_name='central_mf', progress_bar=False)
    _RUNS['central_mf'] = central.run_central(config).run_dir
  return _RUNS['central_mf']


def untrained_run(root: str, name: str, **hparams) -> str:
  """A finished-run directory holding a freshly initialized model (e.g. NeuMF).

  Enough for export tests of models whose training needs more data than
  the synthetic set offers; it has no hparams.json (no split to rebuild).
  """
  key = f'untrained_{name}'
  if key not in _RUNS:
    ratings = synthetic.synthetic_ratings(num_users=30, num_items=40, seed=3).ratings
    rec = registry.build_model(name, ratings.num_users, ratings.num_items, seed=0,
                               init_stddev=0.3, **hparams)
    run_dir = os.path.join(root, key)
    os.makedirs(run_dir)
    artifacts.save_final_model(run_dir, rec.keras_model, ratings, {
        'model': name, 'hparams': hparams, 'task': registry.default_task(name, **hparams),
        'num_users': ratings.num_users, 'num_items': ratings.num_items,
        'user_embedding': 'table', 'algorithm': 'none', 'seed': 0,
        'rating_scale': list(ratings.rating_scale)})
    _RUNS[key] = run_dir
  return _RUNS[key]


def fedrecon_mf(root: str) -> str:
  """Federated Reconstruction MF (user rows on device), a few rounds."""
  if 'fedrecon_mf' not in _RUNS:
    config = experiment.FederatedConfig(
        data=synthetic_data(), model=experiment.ModelConfig('mf', {'embedding_dim': 4}),
        algorithm=algorithms.AlgorithmConfig(
            'fedrecon', client_optimizer=optimizers.OptimizerConfig('sgd', 0.1)),
        clients_per_round=10, total_rounds=3, eval_every=100, eval_clients=10)
    _RUNS['fedrecon_mf'] = experiment.run_federated(config, execution.ExecutionConfig(
        root_output_dir=root, experiment_name='fedrecon_mf', progress_bar=False)).run_dir
  return _RUNS['fedrecon_mf']


def session_root(tmp_path_factory) -> str:
  """One directory for all cached runs of this session."""
  if 'root' not in _RUNS:
    _RUNS['root'] = str(tmp_path_factory.mktemp('runs'))
  return _RUNS['root']
