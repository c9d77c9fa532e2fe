"""Scores images against `shapes` captions: colour, shape, size and position.

Each image is parsed into objects: every pixel takes the nearest palette
colour (or background) within a tolerance, each colour's connected components
are objects once thin rims and specks are removed (a 3x3 opening, then the
object is grown back inside its raw mask), the shape is the template
(circle/square/triangle drawn in the object's box) with the highest IoU, and
the position is the box centre. Blurred edges blend two colours into a third
(blue + background is nearest purple); the opening removes those rims.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image
from scipy import ndimage

from diffusion_jax.data import shapes

# The nearest region centre decides a single object's region.
_REGION_ANCHORS = {
    r: (np.mean(cx), np.mean(cy)) for r, (cx, cy) in shapes.REGION_CENTRES.items()
}
# Boxes at least this wide or tall are "large" (small <= 18 px, large >= 26 px).
_LARGE_THRESHOLD = 22
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """An object found in an image; `box` is (x0, y0, x1, y1), x1/y1 exclusive."""

  color: str
  shape: str
  box: tuple[int, int, int, int]
  area: int

  @property
  def centre(self) -> tuple[float, float]:
    x0, y0, x1, y1 = self.box
    return (x0 + x1) / 2, (y0 + y1) / 2

  @property
  def size(self) -> str:
    x0, y0, x1, y1 = self.box
    return "large" if max(x1 - x0, y1 - y0) >= _LARGE_THRESHOLD else "small"

  @property
  def region(self) -> str:
    cx, cy = self.centre
    return min(_REGION_ANCHORS, key=lambda r: (cx - _REGION_ANCHORS[r][0]) ** 2
               + (cy - _REGION_ANCHORS[r][1]) ** 2)


def _to_canvas(image: np.ndarray) -> np.ndarray:
  """uint8 [S, S, 3] -> uint8 [64, 64, 3] (box filter when shrinking)."""
  size = shapes.IMAGE_SIZE
  if image.shape[:2] == (size, size):
    return image
  if image.shape[0] != image.shape[1]:
    raise ValueError(f"Expected square images, got {image.shape}")
  resample = Image.Resampling.BOX if image.shape[0] > size else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(image).resize((size, size), resample))


def _colour_labels(image: np.ndarray, tolerance: float) -> np.ndarray:
  """int [64, 64]: 0 = background or no colour within tolerance, k = COLORS[k-1]."""
  refs = np.array([shapes.BACKGROUND] + [shapes.PALETTE[c] for c in shapes.COLORS], np.float32)
  dist2 = ((image[:, :, None, :].astype(np.float32) - refs) ** 2).sum(-1)  # [H, W, 7]
  labels = dist2.argmin(-1)
  labels[dist2.min(-1) > tolerance**2] = 0
  return labels


# Moments of each shape filling the unit box: (mean u, mean v, std u, std v).
_SHAPE_MOMENTS = {
    "square": (0.5, 0.5, 12**-0.5, 12**-0.5),
    "circle": (0.5, 0.5, 0.25, 0.25),
    "triangle": (0.5, 2 / 3, 24**-0.5, 18**-0.5),
}


def _blend(image: np.ndarray, color: str) -> np.ndarray:
  """float [H, W]: each pixel's position between background (0) and `color` (1)."""
  background = np.array(shapes.BACKGROUND, np.float32)
  direction = np.array(shapes.PALETTE[color], np.float32) - background
  return (image.astype(np.float32) - background) @ direction / (direction @ direction)


def _classify_shape(mask: np.ndarray) -> str:
  """The shape whose template overlaps `mask` best (IoU).

  Each template's box is fitted to the mask's first and second moments rather
  than to its extremes, so ragged or blurred edges barely move it.
  """
  mask = np.pad(mask, 4)
  ys, xs = np.nonzero(mask)
  mean_x, mean_y = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
  # Sheppard's correction: pixel sampling removes 1/12 px^2 of variance.
  std_x, std_y = np.sqrt(xs.var() + 1 / 12), np.sqrt(ys.var() + 1 / 12)
  v_grid = (np.arange(mask.shape[0]) + 0.5)[:, None]  # [H, 1]
  u_grid = (np.arange(mask.shape[1]) + 0.5)[None, :]  # [1, W]
  ious = []
  for shape in shapes.SHAPES:
    mu, mv, su, sv = _SHAPE_MOMENTS[shape]
    width, height = std_x / su, std_y / sv
    x0, y0 = mean_x - mu * width, mean_y - mv * height
    template = shapes.inside_shape(shape, (u_grid - x0) / width, (v_grid - y0) / height)
    ious.append((template & mask).sum() / (template | mask).sum())
  return shapes.SHAPES[int(np.argmax(ious))]


def detect_objects(image: np.ndarray, *, tolerance: float = 80.0,
                   min_area: int = 20) -> list[DetectedObject]:
  """Objects in one uint8 [S, S, 3] image, largest first.

  Args:
    image: the image; square sizes other than 64 are resized to 64.
    tolerance: RGB distance beyond which a pixel matches no palette colour.
    min_area: objects with fewer pixels left after a 3x3 opening are specks.
  """
  canvas = _to_canvas(np.asarray(image))
  labels = _colour_labels(canvas, tolerance)
  # Cores: each colour without its thin rims (blurred edges of other colours) and specks.
  cores = [ndimage.binary_opening(labels == k, structure=_EIGHT_CONNECTED)
           for k in range(1, len(shapes.COLORS) + 1)]
  any_core = np.any(cores, axis=0)
  found = []
  for k, (color, core) in enumerate(zip(shapes.COLORS, cores), start=1):
    components, count = ndimage.label(core, structure=_EIGHT_CONNECTED)
    for index in range(1, count + 1):
      component = components == index
      if component.sum() < min_area:
        continue
      # Grow back what the opening trimmed (triangle apexes) inside the raw mask.
      component = ndimage.binary_dilation(component, _EIGHT_CONNECTED, iterations=3,
                                          mask=labels == k)
      # Blur rounds the nearest-colour boundary at corners; the half-way blend
      # of background and object colour marks the drawn edge more closely.
      near = ndimage.binary_dilation(component, _EIGHT_CONNECTED, iterations=2)
      near &= ~(any_core & ~core)  # never into another colour's object
      component |= near & (_blend(canvas, color) >= 0.5)
      ys, xs = np.nonzero(component)
      box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
      crop = ndimage.binary_fill_holes(component[box[1]:box[3], box[0]:box[2]])
      found.append(DetectedObject(color, _classify_shape(crop), box, int(crop.sum())))
  return sorted(found, key=lambda o: -o.area)


def _relation(first: DetectedObject, second: DetectedObject) -> str:
  """The relation of `first` to `second` along the axis where they differ most."""
  dx = first.centre[0] - second.centre[0]
  dy = first.centre[1] - second.centre[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def _matches(obj: DetectedObject, want: shapes.ObjectSpec) -> tuple[bool, bool]:
  return obj.color == want.color, obj.shape == want.shape


def score(spec: shapes.CaptionSpec, objects: list[DetectedObject]) -> dict[str, bool]:
  """Per-caption agreement: color, shape, position, count, (size,) all."""
  result = {"count": len(objects) == spec.num_objects}
  if spec.num_objects == 1:
    want = spec.objects[0]
    if objects:  # the best-matching object; ties go to the largest
      obj = max(objects, key=lambda o: sum(_matches(o, want)))
      result["color"], result["shape"] = _matches(obj, want)
      result["size"] = obj.size == want.size
      result["position"] = obj.region == spec.region
    else:
      result.update(color=False, shape=False, size=False, position=False)
  else:
    candidates = list(itertools.permutations(objects[:4], 2))
    if candidates:
      first, second = max(candidates, key=lambda p: sum(_matches(p[0], spec.objects[0]))
                          + sum(_matches(p[1], spec.objects[1])))
      (c0, s0), (c1, s1) = _matches(first, spec.objects[0]), _matches(second, spec.objects[1])
      result.update(color=c0 and c1, shape=s0 and s1,
                    position=_relation(first, second) == spec.relation)
    else:
      result.update(color=False, shape=False, position=False)
  result["all"] = all(result.values())
  return result


def evaluate(images: np.ndarray, captions, *, tolerance: float = 80.0,
             min_area: int = 20) -> dict:
  """Scores images against their captions.

  Args:
    images: uint8 [N, S, S, 3]; S != 64 is resized to 64.
    captions: N `shapes` captions (str or bytes).
    tolerance, min_area: see `detect_objects`.

  Returns:
    {"metrics": {"<group>/<metric>": accuracy}, "details": [per caption], "num_images": N}.
    Groups: all, single, two, held_out (a caption object is a held-out pair),
    seen; metrics: color, shape, position (region or relation), count, all,
    and size for single-object groups. Empty groups are left out.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected uint8 [N, S, S, 3] images, got {images.dtype} {images.shape}")
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  details = []
  for image, caption in zip(images, captions):
    spec = shapes.parse_caption(caption)
    objects = detect_objects(image, tolerance=tolerance, min_area=min_area)
    details.append({"caption": shapes.caption_of(spec), "spec": spec,
                    "objects": objects, "scores": score(spec, objects)})
  groups = {
      "all": lambda s: True,
      "single": lambda s: s.num_objects == 1,
      "two": lambda s: s.num_objects == 2,
      "held_out": lambda s: s.has_held_out_pair,
      "seen": lambda s: not s.has_held_out_pair,
  }
  metrics = {}
  for group, member in groups.items():
    rows = [d["scores"] for d in details if member(d["spec"])]
    for key in sorted({k for r in rows for k in r}):
      values = [r[key] for r in rows if key in r]
      metrics[f"{group}/{key}"] = float(np.mean(values))
  return {"metrics": metrics, "details": details, "num_images": len(details)}
