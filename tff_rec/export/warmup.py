"""TF Serving warmup requests: `assets.extra/tf_serving_warmup_requests`.

A TFRecord file of `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`
protos (one `PredictRequest` per log), which the model server replays after
loading a version so its first real requests do not pay for graph set-up.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

WARMUP_DIR = 'assets.extra'
WARMUP_FILE = 'tf_serving_warmup_requests'
# TF Serving reads at most this many warmup records.
MAX_RECORDS = 1000


def predict_log(model_name: str, signature_name: str,
                inputs: Mapping[str, np.ndarray]) -> prediction_log_pb2.PredictionLog:
  """A PredictionLog holding one PredictRequest for `signature_name`."""
  request = predict_pb2.PredictRequest(
      model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return prediction_log_pb2.PredictionLog(
      predict_log=prediction_log_pb2.PredictLog(request=request))


def warmup_path(saved_model_dir: str) -> str:
  return os.path.join(saved_model_dir, WARMUP_DIR, WARMUP_FILE)


def write_warmup(saved_model_dir: str, logs: Sequence[prediction_log_pb2.PredictionLog]) -> str:
  """Writes the logs as `assets.extra/tf_serving_warmup_requests`; returns its path."""
  if not logs:
    raise ValueError('no warmup requests to write')
  if len(logs) > MAX_RECORDS:
    raise ValueError(f'{len(logs)} warmup requests; TF Serving reads at most {MAX_RECORDS}')
  path = warmup_path(saved_model_dir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with tf.io.TFRecordWriter(tmp) as writer:
    for log in logs:
      writer.write(log.SerializeToString())
  os.replace(tmp, path)
  return path


def read_warmup(path: str) -> list[prediction_log_pb2.PredictionLog]:
  """Parses a warmup file back into PredictionLogs."""
  logs = []
  for record in tf.data.TFRecordDataset(path):
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record.numpy())
    logs.append(log)
  return logs


def request_inputs(log: prediction_log_pb2.PredictionLog) -> dict[str, np.ndarray]:
  """The inputs of a PredictLog's request as numpy arrays."""
  return {k: tf.make_ndarray(v) for k, v in log.predict_log.request.inputs.items()}
