"""Language-model text features of a split's items: catalog text -> pretrained encoder -> cache.

Reads each item's text from the release's catalog (`tff_rec.data.item_text`),
encodes it with the pretrained sentence encoder (`tff_rec.models.text_encoder`,
all-MiniLM-L6-v2 from its verified wheel) and caches the vectors keyed by
model and text checksum. There is no fallback: without the encoder package
the error names the package to install.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from tff_rec.data import item_text
from tff_rec.data import sequences
from tff_rec.data import sources
from tff_rec.models import text_encoder


def split_item_texts(split: sequences.SequenceSplit, *, dataset: str, data_dir: Optional[str],
                     cache_dir: Optional[str] = None, tags: bool = True) -> list[str]:
  """The text of items 1..num_items of `split`, in id order.

  Args:
    split: The split (its item index).
    dataset: The MovieLens release.
    data_dir: Where its files are (None: the download cache).
    cache_dir: The download cache (default ~/.cache/tff_rec).
    tags: ml-latest-small: include its tags.

  Returns:
    One text per item id 1..num_items.
  """
  source = data_dir if data_dir is not None else sources.cache_dir_path(cache_dir)
  texts = item_text.read_item_texts(dataset, source, tags=tags)
  return item_text.texts_for_items(texts, split.item_index)


def text_features(split: sequences.SequenceSplit, *, dataset: str, data_dir: Optional[str],
                  cache_dir: Optional[str] = None, tags: bool = True,
                  spec: text_encoder.PretrainedSpec = text_encoder.MINILM_L6) -> np.ndarray:
  """float32 `[num_items + 1, dim]` sentence embeddings of the items' texts (row 0 zero).

  Args:
    split: The split (its item index).
    dataset: The MovieLens release.
    data_dir: Where its files are (None: the download cache).
    cache_dir: The download cache, which also holds the encodings (default ~/.cache/tff_rec).
    tags: ml-latest-small: include its tags.
    spec: The pretrained encoder.

  Returns:
    The features, one row per item id.

  Raises:
    EncoderUnavailableError: The encoder is not installed or not the pinned files.
    DataError: The catalog is missing or an item has no text.
  """
  texts = split_item_texts(split, dataset=dataset, data_dir=data_dir, cache_dir=cache_dir,
                           tags=tags)
  encoder = text_encoder.load_encoder(spec)
  vectors = text_encoder.encode_cached(
      encoder, texts, cache_dir=os.path.join(sources.cache_dir_path(cache_dir)))
  return np.concatenate([np.zeros((1, encoder.dim), np.float32), vectors])
