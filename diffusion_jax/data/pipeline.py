"""The grain input pipeline: sources by name, then shard, shuffle, transform, batch.

Sources are random-access sequences of {"image": uint8 [H, W, 3], "caption": str}.
`make_dataset` reads one into batches; its iterator is a
`grain.DatasetIterator`, so `get_state()`/`set_state()` (or orbax with
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume mid-epoch with
exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from diffusion_jax.data import transforms as image_transforms

Record = dict[str, Any]
Tokenizer = Callable[[list[str]], np.ndarray]


class ShapesSource:
  """`shapes` records as {"image", "caption": str}.

  With `labels`, the integer labels of `shapes.generate_example` come too
  (boxes stay in 64-pixel coordinates when `image_size` differs).
  """

  def __init__(self, data_source, *, image_size: int = 64, labels: bool = False):
    self._source = data_source
    self.image_size = image_size
    self.labels = labels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    example = self._source[int(index)]
    image = example["image"]
    if image.shape[0] != self.image_size:
      image = image_transforms.resize_center_crop(image, self.image_size)
    record = {"image": image, "caption": example["caption"].decode("utf-8")}
    if self.labels:
      record.update({k: v for k, v in example.items() if k not in ("image", "caption")})
    return record


def _option(config, key: str, default=None):
  """`config.key` for a ConfigDict, dataclass or mapping; `default` when absent or None."""
  if isinstance(config, Mapping):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def get_source(config) -> Sequence[Record]:
  """A random-access source of {"image": uint8 [S, S, 3], "caption": str} records.

  `config` (ConfigDict, dataclass or mapping) fields:
    name: "shapes" | "image_folder" | "tfds:<name>[/<config>][:<version>]".
    split: "train" (default) or another split ("test"; TFDS slicing for tfds).
    image_size: output side S (64 by default).
    data_dir: where TFDS data lives; `shapes` is generated there once and reused
      (TFDS's default, ~/tensorflow_datasets, when None).
    shapes: train_size, test_size (full sizes by default), labels (bool).
    image_folder: path, caption_key ("text"), strict (False), verify_images (True).
    tfds: image_key, caption_key, caption_index, caption_template, download.
  """
  name = _option(config, "name", "shapes")
  split = _option(config, "split", "train")
  image_size = _option(config, "image_size", 64)
  data_dir = _option(config, "data_dir")
  if name == "shapes":
    from diffusion_jax.data import shapes  # pylint: disable=g-import-not-at-top

    splits = shapes.load_shapes(
        data_dir,
        train_size=_option(config, "train_size", shapes.SPLIT_SIZES["train"]),
        test_size=_option(config, "test_size", shapes.SPLIT_SIZES["test"]))
    return ShapesSource(splits[split], image_size=image_size,
                        labels=_option(config, "labels", False))
  if name == "image_folder":
    from diffusion_jax.data import image_folder  # pylint: disable=g-import-not-at-top

    return image_folder.ImageFolderSource(
        _option(config, "path"), image_size=image_size,
        caption_key=_option(config, "caption_key", "text"),
        strict=_option(config, "strict", False),
        verify_images=_option(config, "verify_images", True))
  if name.startswith("tfds:"):
    from diffusion_jax.data import tfds_catalog  # pylint: disable=g-import-not-at-top

    tfds_name = name.removeprefix("tfds:")
    known = tfds_catalog.KNOWN_MAPPINGS.get(tfds_catalog.base_name(tfds_name),
                                            tfds_catalog.FeatureMapping())
    mapping = tfds_catalog.FeatureMapping(**{
        f.name: _option(config, f.name, getattr(known, f.name))
        for f in dataclasses.fields(tfds_catalog.FeatureMapping)})
    return tfds_catalog.TfdsCatalogSource(
        tfds_name, image_size=image_size, split=split, data_dir=data_dir, mapping=mapping,
        download=_option(config, "download", False))
  raise ValueError(f"Unknown data source {name!r}: use 'shapes', 'image_folder' or 'tfds:<name>'")


# ----------------------------------------------------------------------------
# Per-example and per-batch steps.


def _normalize(batch: Record) -> Record:
  return {**batch, "image": image_transforms.to_model_pixels(batch["image"])}


def _tokenize(batch: Record, tokenizer: Tokenizer) -> Record:
  tokens = np.asarray(tokenizer([str(c) for c in batch["caption"]]), np.int32)
  return {**batch, "tokens": tokens}


def _apply(ds: grain.MapDataset, transform) -> grain.MapDataset:
  """Applies a grain transform or a plain callable (record -> record)."""
  if isinstance(transform, grain.transforms.RandomMap):
    return ds.random_map(transform)
  if isinstance(transform, grain.transforms.Filter):
    return ds.filter(transform)
  return ds.map(transform)


def shard(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Process `process_index`'s records: every `process_count`-th, all shards the same size."""
  usable = len(ds) - len(ds) % process_count  # equal shards keep processes in step
  return ds[process_index:usable:process_count]


def make_dataset(source: Sequence[Record], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 transforms: Sequence[Any] = (),
                 tokenizer: Tokenizer | None = None, normalize: bool = False,
                 drop_remainder: bool = True, worker_count: int = 0,
                 worker_buffer_size: int = 1, read_threads: int = 4,
                 prefetch_buffer_size: int = 16) -> grain.DatasetIterator:
  """An iterator of batches {"image", "caption", ["tokens"]} of this process's shard.

  Args:
    source: random-access records {"image": uint8 [H, W, 3], "caption": str}.
    batch_size: examples per batch on this process.
    seed: seeds the shuffle (reshuffled each epoch) and random transforms.
    shuffle: shuffle the records.
    num_epochs: passes over the data; None repeats forever.
    process_index, process_count: this process's shard (jax.process_index() and
      jax.process_count() when None). Shards are disjoint and equally sized.
    transforms: per-record callables or grain transforms (grain's RandomMap for random ones).
    tokenizer: list[str] -> int [B, L]; its output becomes batch["tokens"] (int32).
    normalize: images as float32 in [-1, 1] instead of uint8 in [0, 255].
    drop_remainder: drop a last batch smaller than `batch_size` (finite epochs).
    worker_count: processes that read and transform (0: threads of this process).
    worker_buffer_size: batches each worker process prepares ahead.
    read_threads, prefetch_buffer_size: grain's ReadOptions of this process.

  Returns:
    A `grain.DatasetIterator`; `image` is uint8 [B, H, W, 3] (float32 [-1, 1]
    when `normalize`), `caption` a numpy array of str [B], `tokens` int32 [B, L].
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index, process_count = jax.process_index(), jax.process_count()
  # `seed` seeds every random step below (each with its own derived seed).
  ds = shard(grain.MapDataset.source(source), process_index, process_count).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  for transform in transforms:
    ds = _apply(ds, transform)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if tokenizer is not None:
    ds = ds.map(functools.partial(_tokenize, tokenizer=tokenizer))
  if normalize:
    ds = ds.map(_normalize)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter(iter_ds)
