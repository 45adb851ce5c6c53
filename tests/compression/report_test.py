"""Report sizes, counts and atomic CSV/Markdown output."""

import sys
import pytest
import csv
import gzip
import os

import numpy as np
import tensorflow as tf

from compression import report


def test_disk_bytes_raw_and_gzip(tmp_path):
  (tmp_path / 'a').write_bytes(b'\0' * 10000)
  (tmp_path / 'sub').mkdir()
  noise = np.random.default_rng(0).bytes(5000)
  (tmp_path / 'sub' / 'b').write_bytes(noise)
  raw, zipped = report.disk_bytes(str(tmp_path))
  assert raw == 15000
  assert zipped == len(gzip.compress(b'\0' * 10000, 9, mtime=0)) + len(gzip.compress(noise, 9, mtime=0))
  assert zipped < 6000
  assert report.disk_bytes(str(tmp_path / 'a'))[0] == 10000


def test_param_counts():
  model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
  model.set_weights([np.array([[1, 0], [0, 0], [2, 3]], np.float32), np.zeros(2, np.float32)])
  assert report.param_counts(model) == (8, 3)


def test_write_report_csv_and_markdown(tmp_path):
  rows = [
      report.ReportRow('float32', '/x/1', 4000, 3000, 100, 100, {'rmse': 0.9}, 1.0, 2.0),
      report.ReportRow('int8', '/x/2', 1000, 800, 100, 90, {'rmse': 0.91}, 1.1, 2.5,
                       notes='max |int8 - float| = 0.02'),
  ]
  csv_path, md_path = report.write_report(rows, str(tmp_path / 'r'), extra={'run_dir': 'runs/a'})
  with open(csv_path) as f:
    table = list(csv.DictReader(f))
  assert [r['artifact'] for r in table] == ['float32', 'int8']
  assert table[1]['gzip_bytes'] == '800' and table[1]['rmse'] == '0.91'
  md = open(md_path).read()
  assert '| int8 | 1000 | 800 |' in md
  int8_line = next(line for line in md.splitlines() if line.startswith('| int8 |'))
  header = md.splitlines()[2]
  assert 'max \\|int8 - float\\| = 0.02' in int8_line  # pipes in cells are escaped
  assert int8_line.count(' | ') == header.count(' | ')
  assert 'raw 4.00x smaller' in md and 'rmse +0.0100' in md and 'run_dir: runs/a' in md
  assert sorted(os.listdir(tmp_path / 'r')) == ['compression_report.csv', 'compression_report.md']


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
