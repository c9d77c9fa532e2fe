"""The `shapes` scene specification: palette, shapes, sizes, regions, captions, geometry.

Shared by the generator (`shapes`, which also holds the TFDS builder) and the
evaluator (`shapes_eval`); it imports neither, nor tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

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
# Geometry.


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

