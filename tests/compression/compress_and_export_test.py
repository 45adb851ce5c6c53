"""The compression pipeline (compression/pipeline.py) and its binary's flag validation."""

import sys
import csv
import dataclasses
import os

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from compression import pipeline
from experiments import compress_and_export
from tff_rec.export import serving

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()


def test_prune_int8_tflite_pipeline_with_report(mf_run, tmp_path):
  config = pipeline.PipelineConfig(
      run_dir=mf_run, export_base=str(tmp_path), model_name='mf', version=3,
      prune_sparsity=0.5, prune_schedule='constant', finetune_epochs=1, batch_size=64,
      quantize='int8', tflite='dynamic', latency_requests=20,
      export=serving.ExportOptions(exclude_seen=True, unknown_user='cold_start'))
  result = pipeline.run(config)
  assert result.export.version_dir == str(tmp_path / 'mf' / '3')
  assert sorted(os.listdir(tmp_path / 'mf')) == ['3', 'artifacts']
  assert result.sparsity['item_embedding/embeddings:0'] == pytest.approx(0.5, abs=0.01)
  assert os.path.isfile(result.tflite_path)
  with open(result.report_paths[0]) as f:
    rows = {r['artifact']: r for r in csv.DictReader(f)}
  assert set(rows) == {'float32', 'pruned0.5+int8', 'tflite-dynamic'}
  base, small = rows['float32'], rows['pruned0.5+int8']
  assert int(small['gzip_bytes']) < int(base['gzip_bytes'])
  assert int(small['nonzeros']) < int(base['nonzeros'])
  assert abs(float(small['rmse']) - float(base['rmse'])) < 0.1
  assert float(base['p50_ms']) > 0 and float(small['p99_ms']) >= float(small['p50_ms'])
  assert 'max |tflite - float|' in rows['tflite-dynamic']['notes']
  fn = serving.load_signature(result.export.version_dir, 'recommend')
  assert fn(user_id=tf.constant(['0', 'new user']), k=tf.constant(3))['item_ids'].shape == (2, 3)
  # Same version again: refused before any work.
  with pytest.raises(serving.ExportError, match='already exists'):
    pipeline.run(config)


def test_fedrecon_float16_pipeline(fedrecon_run, tmp_path):
  config = pipeline.PipelineConfig(
      run_dir=fedrecon_run, export_base=str(tmp_path), model_name='recon', quantize='float16',
      latency_requests=10)
  result = pipeline.run(config)
  assert result.export.signatures == ('serving_default', 'recommend_from_history')
  assert [r.artifact for r in result.rows] == ['float32', 'float16']
  assert np.isfinite(result.rows[1].metrics['rmse'])


def test_federated_finetuning_pipeline(fedrecon_run, tff_context, tmp_path):
  del tff_context
  config = pipeline.PipelineConfig(
      run_dir=fedrecon_run, export_base=str(tmp_path), model_name='recon', prune_sparsity=0.6,
      finetune='federated', quantize='int8', latency_requests=10,
      federated=pipeline.federated_finetune.FederatedFinetuneConfig(
          rounds=2, clients_per_round=10, batch_size=8))
  result = pipeline.run(config)
  assert result.sparsity['item_embedding/embeddings:0'] == pytest.approx(0.6, abs=0.01)
  assert [r.artifact for r in result.rows] == ['float32', 'pruned0.6-federated+int8']
  assert np.isfinite(result.rows[1].metrics['rmse'])
  assert os.path.isfile(os.path.join(config.artifacts_dir, 'federated_finetune', 'metrics.csv'))
  # --overwrite with other fine-tuning flags replaces the version and its fine-tuning.
  again = pipeline.run(dataclasses.replace(
      config, overwrite=True, federated=dataclasses.replace(config.federated, rounds=1)))
  assert again.sparsity == pytest.approx(result.sparsity)


@pytest.mark.parametrize('overrides,message', [
    (dict(finetune='federated'), '--finetune: finetune=federated fine-tunes a pruned model'),
    (dict(prune_sparsity=0.5, finetune='federated', federated_rounds=0), '--federated_rounds'),
    (dict(prune_sparsity=0.5, finetune='federated', federated_client_learning_rate=-1.0),
     '--federated_client_learning_rate'),
    (dict(quantize='qat', prune_sparsity=0.5), '--quantize: quantize=qat with pruning'),
    (dict(prune_sparsity=0.5, prune_schedule='polynomial', finetune_epochs=0), '--prune_schedule'),
    (dict(prune_sparsity=1.5), '--prune_sparsity'),
    (dict(version=0), '--version'),
    (dict(model_name='a/b'), '--model_name'),
    (dict(model_name=None), '--model_name is required'),
])
def test_invalid_flags_fail_before_any_work(tmp_path, overrides, message):
  values = dict(run_dir=str(tmp_path / 'no_run'), export_base=str(tmp_path / 'exports'),
                model_name='m')
  values.update(overrides)
  with flagsaver.flagsaver(**values):
    with pytest.raises(app.UsageError, match=message):
      compress_and_export.config_from_flags()
  assert not (tmp_path / 'exports').exists()


def test_missing_run_is_a_usage_error(tmp_path):
  with flagsaver.flagsaver(run_dir=str(tmp_path / 'missing'), export_base=str(tmp_path / 'e'),
                           model_name='m', report=False):
    config = compress_and_export.config_from_flags()
  with pytest.raises(app.UsageError, match='--run_dir: .*no such training run'):
    compress_and_export.run(config)
  assert not (tmp_path / 'e').exists()


def test_existing_version_flag_error(mf_run, tmp_path):
  (tmp_path / 'm' / '1').mkdir(parents=True)
  with flagsaver.flagsaver(run_dir=mf_run, export_base=str(tmp_path), model_name='m'):
    with pytest.raises(app.UsageError, match='--overwrite: .*already exists'):
      compress_and_export.config_from_flags()


def test_svd_basis_on_a_fedrecon_run_is_a_usage_error(fedrecon_run, tmp_path):
  config = pipeline.PipelineConfig(
      run_dir=fedrecon_run, export_base=str(tmp_path / 'e'), model_name='recon',
      prune_sparsity=0.5, prune_schedule='constant', finetune_epochs=0, prune_basis='svd',
      report=False)
  with pytest.raises(pipeline.PipelineError, match='--prune_basis: .*stay on the device'):
    pipeline.run(config)
  assert not (tmp_path / 'e' / 'recon' / '1').exists()


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
