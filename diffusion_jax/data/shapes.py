"""The `shapes` data set: coloured circles, squares and triangles with captions.

Every example is a pure function of (split, index), so any subset can be
generated in any order, in parallel, and reproduced exactly. Half the images
hold one object ("a small red circle on the left"), half hold two
("an orange square to the left of a blue triangle"). The (colour, shape)
pairs in `HELD_OUT_PAIRS` never appear in train, so the test split measures
composition.

The TFDS builder `Shapes` writes array_record files that read back without
TensorFlow (`builder.as_data_source()` or `tfds.data_source("shapes")`).
The palette, captions and geometry live in `shapes_spec`, and `evaluate` (which
parses generated images back into objects and scores them against their
captions) in `shapes_eval`; both are re-exported here and import no TFDS.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# The specification is part of this module's API (`shapes.PALETTE`, `shapes.parse_caption`, ...).
from diffusion_jax.data.shapes_spec import (  # noqa: F401
    BACKGROUND, COLORS, HELD_OUT_PAIRS, IMAGE_SIZE, MAX_PAIR_OFFSET, MIN_PAIR_DISTANCE,
    PAIR_OBJECT_SIZE, PALETTE, REGION_CENTRES, REGIONS, RELATIONS, SHAPES, SIZE_RANGES, SIZES,
    Box, CaptionSpec, ObjectSpec, Scene, caption_of, inside_shape, parse_caption, shape_mask)
# So is the evaluator.
from diffusion_jax.data.shapes_eval import detect_objects, evaluate  # noqa: F401

SPLIT_SIZES = {"train": 50_000, "test": 2_000}
_BASE_SEED = 20240611


# ----------------------------------------------------------------------------
# Sampling (pure function of split and index).


# The (colour, shape) pairs each split draws from, uniformly.
_PAIRS = {
    "train": [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS],
    "test": [(c, s) for c in COLORS for s in SHAPES],
}


class _Draws:
  """Uniform integers hashed from (split, index): cheap, order-free and portable."""

  def __init__(self, split: str, index: int, count: int = 10):
    digest = hashlib.blake2b(f"{_BASE_SEED}/{split}/{index}".encode(), digest_size=4 * count).digest()
    self._uniforms = iter(v / 2**32 for v in struct.unpack(f"<{count}I", digest))

  def integer(self, low: int, high: int) -> int:
    """Uniform in [low, high] (inclusive)."""
    return low + int(next(self._uniforms) * (high - low + 1))


def _start_for_centre(draws: _Draws, centre_range, side: int) -> int:
  """A box start whose centre (start + side/2) lies in `centre_range`, clamped onto the canvas."""
  low = math.ceil(centre_range[0] - side / 2)
  high = math.floor(centre_range[1] - side / 2)
  return min(max(draws.integer(low, high), 0), IMAGE_SIZE - side)


def _single_scene(draws: _Draws, pairs) -> Scene:
  color, shape = pairs[draws.integer(0, len(pairs) - 1)]
  size = SIZES[draws.integer(0, 1)]
  region = REGIONS[draws.integer(0, len(REGIONS) - 1)]
  side = draws.integer(*SIZE_RANGES[size])
  cx_range, cy_range = REGION_CENTRES[region]
  x0 = _start_for_centre(draws, cx_range, side)
  y0 = _start_for_centre(draws, cy_range, side)
  spec = CaptionSpec((ObjectSpec(color, shape, size),), region=region)
  return Scene(spec, ((x0, y0, x0 + side, y0 + side),))


def _pair_scene(draws: _Draws, pairs) -> Scene:
  first = draws.integer(0, len(pairs) - 1)
  second = draws.integer(0, len(pairs) - 2)
  second += second >= first  # a different (colour, shape) pair
  objects = (ObjectSpec(*pairs[first]), ObjectSpec(*pairs[second]))
  relation = RELATIONS[draws.integer(0, len(RELATIONS) - 1)]
  side, room = PAIR_OBJECT_SIZE, IMAGE_SIZE - PAIR_OBJECT_SIZE
  # Along the named axis: the "earlier" object starts at `low`, the other `gap` later.
  gap = draws.integer(MIN_PAIR_DISTANCE, room)
  low = draws.integer(0, room - gap)
  # Across it: a shared position with a small offset.
  across0 = draws.integer(0, room)
  across1 = min(max(across0 + draws.integer(-MAX_PAIR_OFFSET, MAX_PAIR_OFFSET), 0), room)
  first_is_earlier = relation in ("to the left of", "above")
  along0, along1 = (low, low + gap) if first_is_earlier else (low + gap, low)
  if relation in ("to the left of", "to the right of"):
    starts = ((along0, across0), (along1, across1))
  else:
    starts = ((across0, along0), (across1, along1))
  boxes = tuple((x, y, x + side, y + side) for x, y in starts)
  return Scene(CaptionSpec(objects, relation=relation), boxes)


def sample_scene(split: str, index: int) -> Scene:
  """The scene of example `index` of `split` ("train" or "test"); even indices hold one object."""
  draws, pairs = _Draws(split, index), _PAIRS[split]
  return _single_scene(draws, pairs) if index % 2 == 0 else _pair_scene(draws, pairs)


# ----------------------------------------------------------------------------
# Rasterisation.


def render(scene: Scene) -> np.ndarray:
  """Draws a scene: uint8 [64, 64, 3], flat colours on the background."""
  image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  image[...] = BACKGROUND
  for obj, (x0, y0, x1, y1) in zip(scene.spec.objects, scene.boxes):
    mask = shape_mask(obj.shape, y1 - y0, x1 - x0)
    image[y0:y1, x0:x1][mask] = PALETTE[obj.color]
  return image


# ----------------------------------------------------------------------------
# Examples and the TFDS builder.


def _labels(scene: Scene) -> dict[str, np.ndarray]:
  """Fixed-size integer labels (indices into COLORS, SHAPES, ...; -1 = absent)."""
  spec, n = scene.spec, scene.spec.num_objects
  colors = np.full((2,), -1, np.int32)
  shapes = np.full((2,), -1, np.int32)
  boxes = np.full((2, 4), -1, np.int32)
  for i, (obj, box) in enumerate(zip(spec.objects, scene.boxes)):
    colors[i], shapes[i], boxes[i] = COLORS.index(obj.color), SHAPES.index(obj.shape), box
  first = spec.objects[0]
  return {
      "num_objects": np.int32(n),
      "colors": colors,
      "shapes": shapes,
      "boxes": boxes,
      "size": np.int32(SIZES.index(first.size) if n == 1 else -1),
      "region": np.int32(REGIONS.index(spec.region) if n == 1 else -1),
      "relation": np.int32(RELATIONS.index(spec.relation) if n == 2 else -1),
      "held_out": np.bool_(spec.has_held_out_pair),
  }


def generate_example(split: str, index: int) -> dict[str, np.ndarray | str]:
  """Example `index` of `split`: {"image", "caption", labels...} (see `Shapes` features)."""
  scene = sample_scene(split, index)
  return {"image": render(scene), "caption": caption_of(scene.spec), **_labels(scene)}


def _labels_features() -> dict:
  scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)  # noqa: E731
  return {
      "num_objects": scalar(),
      "colors": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # COLORS index, -1 = none
      "shapes": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # SHAPES index, -1 = none
      "boxes": tfds.features.Tensor(shape=(2, 4), dtype=np.int32),  # x0, y0, x1, y1 (exclusive)
      "size": scalar(),  # SIZES index, -1 for two objects
      "region": scalar(),  # REGIONS index, -1 for two objects
      "relation": scalar(),  # RELATIONS index, -1 for one object
      "held_out": tfds.features.Tensor(shape=(), dtype=np.bool_),
  }


class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes of a `shapes` build; smaller builds hold a prefix of the full one."""

  def __init__(self, *, train_size: int = SPLIT_SIZES["train"],
               test_size: int = SPLIT_SIZES["test"], name: str | None = None, **kwargs):
    name = name or f"train{train_size}_test{test_size}"
    super().__init__(name=name, description=f"train {train_size}, test {test_size}", **kwargs)
    self.train_size = train_size
    self.test_size = test_size


class Shapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the `shapes` data set (array_record, readable without TensorFlow).

  Record `i` of a split is `generate_example(split, i)`, a pure function, so
  any range of records can be generated anywhere, in any order. Rendering is
  the smaller part of a build's CPU time (TFDS's serialisation and zlib take
  the rest, in the writing process), so the build runs in one process.
  """

  name = "shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="full"),
      ShapesConfig(name="small", train_size=2_000, test_size=500),
      ShapesConfig(name="tiny", train_size=128, test_size=64),
  ]
  DEFAULT_CONFIG_NAME = "full"

  # TFDS's default looks the package up with `importlib_resources`, which it
  # does not install on Python >= 3.9; this file is the answer it wants.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                      encoding="zlib"),
        "caption": tfds.features.Text(),
        **_labels_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,  # record i == generate_example(split, i)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        "train": self._generate_examples("train", self.builder_config.train_size),
        "test": self._generate_examples("test", self.builder_config.test_size),
    }

  def _generate_examples(self, split: str, size: int) -> Iterator[tuple[int, dict]]:
    for index in range(size):
      yield index, generate_example(split, index)


def shapes_builder(data_dir: str | None = None, *, train_size: int = SPLIT_SIZES["train"],
                   test_size: int = SPLIT_SIZES["test"]) -> Shapes:
  """A `Shapes` builder with the given split sizes (a named config when one matches)."""
  config = next((c for c in Shapes.BUILDER_CONFIGS
                 if (c.train_size, c.test_size) == (train_size, test_size)), None)
  config = config or ShapesConfig(train_size=train_size, test_size=test_size)
  return Shapes(config=config, data_dir=data_dir)


def load_shapes(data_dir: str | None = None, **sizes) -> dict:
  """Builds `shapes` once under `data_dir` (reused afterwards); returns {split: data source}."""
  builder = shapes_builder(data_dir, **sizes)
  builder.download_and_prepare()
  return builder.as_data_source()
