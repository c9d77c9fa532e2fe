"""Any TFDS catalog data set as {"image", "caption"} records, read without TensorFlow.

The data set must be prepared in array_record format (`tfds build
--file_format=array_record`, or `download=True` here); it is read through
`tfds.data_source`. A `FeatureMapping` says where the image and the caption
are in an example: e.g. coco_captions keeps several captions under
"captions/text" (one is taken), and classification sets such as tf_flowers
have a class label, turned into text through a template.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class FeatureMapping:
  """Where an example keeps its image and caption.

  Keys are "/"-separated paths into the decoded example. The caption may be a
  string, an array of strings (element `caption_index` is taken, modulo the
  count), or a `ClassLabel` (its name is used). `caption_template` formats
  the result, e.g. "a photo of a {}".
  """

  image_key: str = "image"
  caption_key: str = "caption"
  caption_index: int = 0
  caption_template: str = "{}"


# Mappings of catalog data sets, used when none is given.
KNOWN_MAPPINGS = {
    "coco_captions": FeatureMapping("image", "captions/text"),
    "tf_flowers": FeatureMapping("image", "label", caption_template="a photo of {}"),
    "oxford_flowers102": FeatureMapping("image", "label",
                                        caption_template="a photo of a {}, a type of flower"),
    "food101": FeatureMapping("image", "label", caption_template="a photo of {}, a type of food"),
    "cifar10": FeatureMapping("image", "label", caption_template="a photo of a {}"),
    "cifar100": FeatureMapping("image", "label", caption_template="a photo of a {}"),
}


def base_name(name: str) -> str:
  """"coco_captions/2017:1.1.0" -> "coco_captions"."""
  return name.split(":")[0].split("/")[0]


def _lookup(tree, key: str):
  for part in key.split("/"):
    tree = tree[part]
  return tree


def _feature_at(features: tfds.features.FeaturesDict, key: str) -> tfds.features.FeatureConnector:
  """The feature connector at a "/"-separated key, looking through Sequences."""
  feature = features
  for part in key.split("/"):
    while isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    feature = feature[part]
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return feature


def _as_text(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


class TfdsCatalogSource:
  """Random access to {"image": uint8 [size, size, 3], "caption": str} records of a TFDS data set."""

  def __init__(self, name: str, *, image_size: int, split: str = "train",
               data_dir: str | os.PathLike | None = None, mapping: FeatureMapping | None = None,
               download: bool = False, resample: int = Image.Resampling.BICUBIC):
    """Opens the data set.

    Args:
      name: a TFDS name, optionally with config and version ("coco_captions/2017:1.1.0").
      image_size: output side; images are resized (shorter side) and centre-cropped.
      split: a TFDS split (slicing such as "train[:90%]" works).
      data_dir: where TFDS keeps prepared data sets (TFDS's default when None).
      mapping: image and caption keys; `KNOWN_MAPPINGS[name]` or the defaults when None.
      download: prepare the data set if it is not there yet.
    """
    self.name = name
    self.image_size = image_size
    self.resample = resample
    self.mapping = mapping or KNOWN_MAPPINGS.get(base_name(name), FeatureMapping())
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    caption_feature = _feature_at(self._source.dataset_info.features, self.mapping.caption_key)
    self._label_names = (caption_feature.names
                         if isinstance(caption_feature, tfds.features.ClassLabel) else None)

  def _caption(self, example) -> str:
    value = _lookup(example, self.mapping.caption_key)
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
      # several captions: take one (none at all gives an empty caption)
      value = value[self.mapping.caption_index % len(value)] if len(value) else ""
    if self._label_names is not None:
      value = self._label_names[int(value)]
    return self.mapping.caption_template.format(_as_text(value))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    example = self._source[int(index)]
    image = np.asarray(_lookup(example, self.mapping.image_key))
    return {
        "image": transforms.resize_center_crop(image, self.image_size, self.resample),
        "caption": self._caption(example),
    }

  def __repr__(self) -> str:
    return f"TfdsCatalogSource({self.name!r}, len={len(self)}, mapping={self.mapping})"
