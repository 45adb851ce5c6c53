"""Warmup files round-trip as PredictionLogs."""

import sys
import numpy as np
import pytest

from tff_rec.export import warmup


def test_write_and_read_prediction_logs(tmp_path):
  logs = [
      warmup.predict_log('m', 'serving_default', {
          'user_id': np.array([b'1', b'2'], dtype=object), 'item_id': np.array([b'3', b'4'], dtype=object)}),
      warmup.predict_log('m', 'recommend', {'user_id': np.array([b'1'], dtype=object), 'k': np.int32(10)}),
  ]
  path = warmup.write_warmup(str(tmp_path), logs)
  assert path == str(tmp_path / 'assets.extra' / 'tf_serving_warmup_requests')
  back = warmup.read_warmup(path)
  assert back == logs
  inputs = warmup.request_inputs(back[1])
  assert inputs['user_id'].tolist() == [b'1'] and int(inputs['k']) == 10
  assert back[0].predict_log.request.model_spec.signature_name == 'serving_default'
  assert not list(tmp_path.glob('assets.extra/*.tmp'))


def test_refuses_empty_or_too_many(tmp_path):
  with pytest.raises(ValueError, match='no warmup'):
    warmup.write_warmup(str(tmp_path), [])
  log = warmup.predict_log('m', 's', {'k': np.int32(1)})
  with pytest.raises(ValueError, match='at most 1000'):
    warmup.write_warmup(str(tmp_path), [log] * 1001)


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
