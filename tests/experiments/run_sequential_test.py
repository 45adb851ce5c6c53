"""run_sequential: flag errors before any work; a short SASRec run on real ML-100K."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import shared_data
from tff_rec.export import serving


def _binary(*argv):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, '-m', 'experiments.run_sequential', *argv], cwd=shared_data.REPO_ROOT,
      env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize('argv,message', [
    (['--epochs=0'], '--epochs must be positive, got 0'),
    (['--num_heads=3'], '--num_heads=3 must divide --hidden_units=50'),
    (['--num_negatives=5'], '--num_negatives applies to --loss=sampled_softmax'),
    (['--data_dir=/nonexistent/dir'], '--data_dir=/nonexistent/dir does not exist'),
    (['--rounds=5'], '--rounds needs --training=fedavg'),
    (['--dp=gaussian_fixed', '--dp_noise_multiplier=1', '--dp_clip=1'],
     '--dp needs --training=fedavg'),
    (['--training=fedavg', '--epochs=3'], '--epochs is a flag of --training=central'),
    (['--training=fedavg', '--dp=gaussian_fixed', '--dp_clip=1'],
     '--dp=gaussian_fixed needs --dp_noise_multiplier or --target_epsilon'),
])
def test_bad_flags_fail_cleanly_before_any_work(argv, message, tmp_path):
  proc = _binary(*argv, f'--root_output_dir={tmp_path}')
  assert proc.returncode == 2
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_sasrec_on_ml100k(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  argv = ['--dataset=ml-100k', f'--data_dir={data_dir}', '--maxlen=50', '--hidden_units=16',
          '--epochs=4', '--eval_every=2', f'--root_output_dir={tmp_path}',
          '--experiment_name=s', '--progress_bar=false', f'--export_base={tmp_path / "serving"}']
  proc = _binary(*argv)
  assert proc.returncode == 0, proc.stderr
  assert 'best epoch' in proc.stdout
  run_dir = tmp_path / 's'
  history = json.loads((run_dir / 'history.json').read_text())
  assert [h['epoch'] for h in history] == [2, 4]
  result = json.loads((run_dir / 'result.json').read_text())
  assert result['data']['users'] == 943 and result['config']['hparams']['hidden_units'] == 16
  assert result['best_epoch'] in (2, 4)
  # A popularity-free sanity bound: well above the 10/101 of random scores.
  assert result['test']['hr@10'] > 0.2
  # The best model is exported for TF Serving and recommends from recent items.
  assert result['export'] == str(tmp_path / 'serving' / 'sasrec' / '1')
  out = serving.predict_in_fresh_process(result['export'], 'recommend', {
      'history_item_id': np.array([['50', '172', '181']], dtype=object), 'k': np.int32(10)})
  recommended = [x.decode() for x in out['item_ids'][0]]
  assert len(set(recommended)) == 10 and not {'50', '172', '181'} & set(recommended)
  again = _binary(*argv)
  assert again.returncode == 2 and 'serving/sasrec/1 already exists' in again.stderr
  again = _binary(*argv[:-1])
  assert again.returncode == 2 and 'already holds a finished run' in again.stderr


@pytest.mark.slow
def test_language_model_item_features_on_ml_latest_small(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-latest-small.zip'))
  proc = _binary('--dataset=ml-latest-small', f'--data_dir={data_dir}', '--maxlen=20',
                 '--hidden_units=16', '--epochs=1', '--item_text=input',
                 f'--cache_dir={tmp_path / "cache"}', f'--root_output_dir={tmp_path}',
                 '--experiment_name=lm', '--progress_bar=false')
  assert proc.returncode == 0, proc.stderr
  result = json.loads((tmp_path / 'lm' / 'result.json').read_text())
  assert result['config']['item_text'] == 'input'
  assert result['data']['items'] == 3650
  # The encodings were cached, keyed by model and text checksum.
  assert [p.name.startswith('all-MiniLM-L6-v2-') for p in (tmp_path / 'cache' / 'text_embeddings').iterdir()] == [True]



@pytest.mark.slow
def test_dp_fedavg_on_ml100k(tmp_path):
  data_dir = os.path.dirname(shared_data.shared_file('ml-100k.zip'))
  proc = _binary('--dataset=ml-100k', f'--data_dir={data_dir}', '--maxlen=20', '--hidden_units=8',
                 '--training=fedavg', '--rounds=4', '--clients_per_round=16',
                 '--eval_every_rounds=2', '--dp=gaussian_fixed', '--dp_noise_multiplier=1.0',
                 '--dp_clip=0.5', f'--root_output_dir={tmp_path}', '--experiment_name=f',
                 '--progress_bar=false')
  assert proc.returncode == 0, proc.stderr
  assert 'best round' in proc.stdout
  history = json.loads((tmp_path / 'f' / 'history.json').read_text())
  assert [h['round'] for h in history] == [2, 4]
  assert 0 < history[0]['dp/epsilon'] < history[1]['dp/epsilon'] < float('inf')
  result = json.loads((tmp_path / 'f' / 'result.json').read_text())
  assert result['dp']['population'] == 943 and result['dp']['clients_per_round'] == 16
  assert result['dp_epsilon'] == pytest.approx(history[1]['dp/epsilon'])
  assert result['federated']['rounds'] == 4 and result['training'] == 'fedavg'


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
