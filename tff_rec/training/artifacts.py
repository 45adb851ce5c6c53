"""Atomic writes of run outputs: JSON files, the final model, id mappings."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import tensorflow as tf

from tff_rec import atomic
from tff_rec.data import ratings as ratings_lib

FINAL_MODEL_DIR = 'final_model'
MODEL_CONFIG_FILE = 'model_config.json'


def write_json(path: str, value: Any) -> None:
  """Writes `value` as strict JSON to `path` atomically (ValueError on NaN or infinity)."""
  atomic.write_json(path, value)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_final_model(
    run_dir: str,
    keras_model: tf.keras.Model,
    ratings: ratings_lib.Ratings,
    model_config: Mapping[str, Any],
) -> str:
  """Saves the Keras SavedModel, raw-id maps and config under run_dir/final_model.

  Written to a temporary sibling and renamed, so a crash never leaves a
  half-written final model.
  """
  final = os.path.join(run_dir, FINAL_MODEL_DIR)
  tmp = tempfile.mkdtemp(prefix='.final_model_tmp', dir=run_dir)
  try:
    keras_model.save(os.path.join(tmp, 'keras'), save_format='tf', include_optimizer=False)
    keras_model.save_weights(os.path.join(tmp, 'weights', 'weights'))
    ratings.save_id_maps(tmp)
    write_json(os.path.join(tmp, MODEL_CONFIG_FILE), dict(model_config))
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


class RunOutputError(ValueError):
  """A training run directory that is missing or incomplete."""


def load_final_model(run_dir: str):
  """Rebuilds a run's final Keras model from its config and weights.

  Returns `(rec_model, model_config, user_index, item_index)`, where
  `rec_model` is a `tff_rec.models.base.RecModel`. Raises RunOutputError
  naming what is missing when the run is absent or did not finish.
  """
  from tff_rec.models import registry  # pylint: disable=g-import-not-at-top

  final = os.path.join(run_dir, FINAL_MODEL_DIR)
  if not os.path.isdir(run_dir):
    raise RunOutputError(f'{run_dir}: no such training run directory')
  if not os.path.isdir(final):
    raise RunOutputError(
        f'{run_dir}: no {FINAL_MODEL_DIR}/ — the run did not finish (rerun it to resume)')
  config_path = os.path.join(final, MODEL_CONFIG_FILE)
  for needed in (config_path, os.path.join(final, 'weights', 'weights.index'),
                 os.path.join(final, 'user_ids.txt'), os.path.join(final, 'item_ids.txt')):
    if not os.path.exists(needed):
      raise RunOutputError(f'{run_dir}: incomplete final model, missing {needed}')
  config = read_json(config_path)
  rec = registry.build_model(
      config['model'], config['num_users'], config['num_items'],
      personal=config['user_embedding'] != 'table', seed=config.get('seed', 0),
      **config['hparams'])
  rec.keras_model.load_weights(os.path.join(final, 'weights', 'weights')).expect_partial()
  user_index, item_index = ratings_lib.load_id_maps(final)
  return rec, config, user_index, item_index
