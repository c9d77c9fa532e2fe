"""The `shapes` data set: coloured circles, squares and triangles with captions.

Every example is a pure function of (split, index), so any subset can be
generated in any order, in parallel, and reproduced exactly. Half the images
hold one object ("a small red circle on the left"), half hold two
("an orange square to the left of a blue triangle"). The (colour, shape)
pairs in `HELD_OUT_PAIRS` never appear in train, so the test split measures
composition.

The TFDS builder `Shapes` writes array_record files that read back without
TensorFlow (`builder.as_data_source()` or `tfds.data_source("shapes")`).
`evaluate` (in `shapes_eval`, re-exported here) parses generated images back
into objects and scores them against their captions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import struct
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

IMAGE_SIZE = 64
BACKGROUND = (245, 245, 245)
PALETTE = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 70, 190),
    "orange": (240, 140, 40),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
REGIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the center")
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("purple", "circle")})
SPLIT_SIZES = {"train": 50_000, "test": 2_000}

# Side length ranges (inclusive) of single objects, and the side of paired objects.
SIZE_RANGES = {"small": (14, 18), "large": (26, 32)}
PAIR_OBJECT_SIZE = 16
# Box-centre ranges (inclusive) per region: ((cx_min, cx_max), (cy_min, cy_max)).
REGION_CENTRES = {
    "at the top": ((28, 36), (12, 20)),
    "at the bottom": ((28, 36), (44, 52)),
    "on the left": ((12, 20), (28, 36)),
    "on the right": ((44, 52), (28, 36)),
    "in the center": ((29, 35), (29, 35)),
}
# Paired objects: centres at least this far apart along the named axis, and at
# most `MAX_PAIR_OFFSET` apart across it, so the relation is never ambiguous.
MIN_PAIR_DISTANCE = 20
MAX_PAIR_OFFSET = 10

_BASE_SEED = 20240611

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive, pixels.


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  """One captioned object; `size` is None for objects of two-object captions."""

  color: str
  shape: str
  size: str | None = None


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
  """A parsed caption: one object with a region, or two with a relation.

  For two objects the relation reads `objects[0] <relation> objects[1]`.
  """

  objects: tuple[ObjectSpec, ...]
  region: str | None = None
  relation: str | None = None

  @property
  def num_objects(self) -> int:
    return len(self.objects)

  @property
  def has_held_out_pair(self) -> bool:
    return any((o.color, o.shape) in HELD_OUT_PAIRS for o in self.objects)


@dataclasses.dataclass(frozen=True)
class Scene:
  """A caption plus the pixel boxes of its objects (same order)."""

  spec: CaptionSpec
  boxes: tuple[Box, ...]


# ----------------------------------------------------------------------------
# Captions.


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ObjectSpec) -> str:
  words = [w for w in (obj.size, obj.color, obj.shape) if w]
  return f"{_article(words[0])} {' '.join(words)}"


def caption_of(spec: CaptionSpec) -> str:
  """The caption text of a `CaptionSpec`."""
  if spec.num_objects == 1:
    return f"{_phrase(spec.objects[0])} {spec.region}"
  return f"{_phrase(spec.objects[0])} {spec.relation} {_phrase(spec.objects[1])}"


_C, _S = "|".join(COLORS), "|".join(SHAPES)
_SINGLE_RE = re.compile(
    rf"(?:a|an) (?P<size>small|large) (?P<c>{_C}) (?P<s>{_S}) (?P<where>{'|'.join(REGIONS)})")
_PAIR_RE = re.compile(
    rf"(?:a|an) (?P<c0>{_C}) (?P<s0>{_S}) (?P<rel>{'|'.join(RELATIONS)}) (?:a|an) (?P<c1>{_C}) (?P<s1>{_S})")


def parse_caption(caption: str | bytes) -> CaptionSpec:
  """Parses a `shapes` caption into a `CaptionSpec`; raises ValueError otherwise.

  Case, surrounding whitespace, repeated spaces and a final period are ignored.
  """
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  text = " ".join(caption.lower().strip().rstrip(".").split())
  if m := _SINGLE_RE.fullmatch(text):
    return CaptionSpec((ObjectSpec(m["c"], m["s"], m["size"]),), region=m["where"])
  if m := _PAIR_RE.fullmatch(text):
    objects = (ObjectSpec(m["c0"], m["s0"]), ObjectSpec(m["c1"], m["s1"]))
    return CaptionSpec(objects, relation=m["rel"])
  raise ValueError(f"Not a shapes caption: {caption!r}")


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


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether points (u, v), in box units ([0, 1] spans the box, v downwards), lie in `shape`."""
  in_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
  if shape == "square":
    return in_box
  if shape == "circle":
    return (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1.0
  if shape == "triangle":  # apex at the top centre, base along the bottom edge
    return in_box & (np.abs(u - 0.5) <= v / 2)
  raise ValueError(f"Unknown shape {shape!r}")


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
  """Boolean [height, width] mask of `shape` filling its box (read-only, cached).

  Exact integer arithmetic, so masks are mirror-symmetric. Pixels are tested
  at their centres; triangle rows at their lower edge, so the apex row is
  drawn and the base row spans the box.
  """
  dx = 2 * np.arange(width)[None, :] + 1 - width  # [1, W]: 2 * (x centre - box centre)
  y = np.arange(height)[:, None]  # [H, 1]
  if shape == "square":
    mask = np.ones((height, width), bool)
  elif shape == "circle":
    dy = 2 * y + 1 - height
    mask = (dx * height) ** 2 + (dy * width) ** 2 <= (width * height) ** 2
  elif shape == "triangle":  # apex at the top centre, base along the bottom edge
    mask = height * np.abs(dx) <= width * (y + 1)
  else:
    raise ValueError(f"Unknown shape {shape!r}")
  mask.flags.writeable = False
  return mask


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
  the rest, in the writing process), so the build runs in one process: the
  full data set takes about 12 CPU seconds and 20 MB.
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


# The evaluator lives in its own module; it is part of this data set's API.
from diffusion_jax.data.shapes_eval import detect_objects, evaluate  # noqa: E402,F401
