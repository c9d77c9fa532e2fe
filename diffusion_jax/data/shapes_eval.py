"""Scores images against `shapes` captions as strictly as a person looking at them.

Each image is parsed into objects: a pixel is foreground when it differs from
the background by more than `background_tolerance` levels in some channel,
and an object is a connected (8-neighbour) region of foreground pixels that
are nearer a palette colour than the background; smaller regions than
`min_area` are specks. Then, per image:
  - clean background: no foreground pixel outside the objects, bar
    `max_stray_pixels` (4) stray ones, except anti-aliased edges (blends of
    the background and a palette colour within 2 px of an object), so
    tinted patches, textures, stains and specks fail it;
  - flat colour: at least `flat_fraction` of an object's interior (the object
    eroded by 2 px, fewer when that leaves nothing) is nearest to one palette
    colour within `color_tolerance`; otherwise the object's colour is "mixed"
    and matches no caption;
  - count: exactly as many objects as the caption names;
  - shape: the template (circle/square/triangle fitted to the object's
    moments) with the highest IoU; size and position from the object's box.
Only numpy: components are labelled by max-propagation with pointer jumping,
over the whole batch at once.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from PIL import Image

from diffusion_jax.data import shapes_spec as spec_lib
from diffusion_jax.data import transforms

# The nearest region centre decides a single object's region.
_REGION_ANCHORS = {
    r: (np.mean(cx), np.mean(cy)) for r, (cx, cy) in spec_lib.REGION_CENTRES.items()
}
# Boxes at least this wide or tall are "large" (small <= 18 px, large >= 26 px).
_LARGE_THRESHOLD = 22
# Anti-aliased edges reach this far beyond an object's nearest-colour boundary.
_RIM = 2
# Images parsed at a time.
_CHUNK = 128
MIXED = "mixed"
# Background first, then the palette in `COLORS` order.
_REFERENCES = np.array([spec_lib.BACKGROUND] + [spec_lib.PALETTE[c] for c in spec_lib.COLORS],
                       np.float32)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """An object found in an image; `box` is (x0, y0, x1, y1), x1/y1 exclusive.

  `color` is the palette colour of a flat object, else "mixed"; `dominant_color`
  is the most common palette colour of its interior and `color_fraction` its share.
  """

  color: str
  shape: str
  box: tuple[int, int, int, int]
  area: int
  dominant_color: str = ""
  color_fraction: float = 1.0

  @property
  def flat(self) -> bool:
    return self.color != MIXED

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


@dataclasses.dataclass(frozen=True)
class ParsedImage:
  """The objects of one image (largest first) and its stray foreground pixels."""

  objects: list[DetectedObject]
  dirty_pixels: int  # foreground pixels outside the objects' rims
  clean_background: bool


# ----------------------------------------------------------------------------
# Morphology and labelling on bool/int arrays [..., H, W].


def _window(values: np.ndarray, radius: int, reduce, fill) -> np.ndarray:
  """`reduce` (np.maximum or np.minimum) over the (2r+1)^2 window; outside the array is `fill`."""
  for axis in (values.ndim - 2, values.ndim - 1):  # a square window: a column window, then a row one
    n = values.shape[axis]
    padded_shape = list(values.shape)
    padded_shape[axis] += 2 * radius
    padded = np.full(padded_shape, fill, values.dtype)
    inner = [slice(None)] * values.ndim
    inner[axis] = slice(radius, radius + n)
    padded[tuple(inner)] = values
    out = values
    for shift in range(2 * radius + 1):
      inner[axis] = slice(shift, shift + n)
      out = reduce(out, padded[tuple(inner)])
    values = out
  return values


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  return _window(mask, radius, np.maximum, False) if radius else mask


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
  return _window(mask, radius, np.minimum, False) if radius else mask


def label_components(mask: np.ndarray) -> np.ndarray:
  """8-connected components of bool `mask` [..., H, W]: int32, -1 off the mask.

  A component's label is the flat index (into `mask`) of its last pixel, so
  labels are unique across a batch.
  """
  labels = np.where(mask, np.arange(mask.size, dtype=np.int32).reshape(mask.shape), -1)
  while True:
    grown = np.where(mask, _window(labels, 1, np.maximum, -1), -1).ravel()
    # Pointer jumping: a label names a pixel of the same component whose label is
    # at least as large, so following it converges in few rounds.
    on = grown >= 0
    for _ in range(2):
      grown[on] = grown[grown[on]]
    grown = grown.reshape(mask.shape)
    if np.array_equal(grown, labels):
      return labels
    labels = grown


# ----------------------------------------------------------------------------
# Objects.


# Moments of each shape filling the unit box: (mean u, mean v, std u, std v).
_SHAPE_MOMENTS = {
    "square": (0.5, 0.5, 12**-0.5, 12**-0.5),
    "circle": (0.5, 0.5, 0.25, 0.25),
    "triangle": (0.5, 2 / 3, 24**-0.5, 18**-0.5),
}


def _classify_shape(mask: np.ndarray) -> str:
  """The shape whose template overlaps `mask` best (IoU).

  Each template's box is fitted to the mask's first and second moments rather
  than to its extremes, so ragged or blurred edges barely move it.
  """
  padded = np.zeros((mask.shape[0] + 8, mask.shape[1] + 8), bool)
  padded[4:-4, 4:-4] = mask
  mask = padded
  ys, xs = np.nonzero(mask)
  mean_x, mean_y = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
  # Sheppard's correction: pixel sampling removes 1/12 px^2 of variance.
  std_x, std_y = np.sqrt(xs.var() + 1 / 12), np.sqrt(ys.var() + 1 / 12)
  v_grid = (np.arange(mask.shape[0]) + 0.5)[:, None]  # [H, 1]
  u_grid = (np.arange(mask.shape[1]) + 0.5)[None, :]  # [1, W]
  ious = []
  for shape in spec_lib.SHAPES:
    mu, mv, su, sv = _SHAPE_MOMENTS[shape]
    width, height = std_x / su, std_y / sv
    x0, y0 = mean_x - mu * width, mean_y - mv * height
    template = spec_lib.inside_shape(shape, (u_grid - x0) / width, (v_grid - y0) / height)
    ious.append((template & mask).sum() / (template | mask).sum())
  return spec_lib.SHAPES[int(np.argmax(ious))]


def _to_canvas(images: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3] -> uint8 [N, 64, 64, 3] (box filter when shrinking)."""
  size = spec_lib.IMAGE_SIZE
  if images.shape[1:3] == (size, size):
    return images
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"Expected square images, got {images.shape[1:]}")
  resample = Image.Resampling.BOX if images.shape[1] > size else Image.Resampling.BILINEAR
  return np.stack([transforms.resize_center_crop(i, size, resample) for i in images])


def _blend_distance(pixels: np.ndarray) -> np.ndarray:
  """float [M]: RGB distance of pixels [M, 3] from the nearest background-to-palette-colour segment."""
  offsets = pixels[:, None, :] - _REFERENCES[0]  # [M, 1, 3]
  directions = _REFERENCES[1:] - _REFERENCES[0]  # [6, 3]
  t = np.clip((offsets * directions).sum(-1) / (directions**2).sum(-1), 0, 1)  # [M, 6]
  return np.sqrt(((offsets - t[..., None] * directions) ** 2).sum(-1).min(-1))


def parse_images(images: np.ndarray, *, background_tolerance: int = 12,
                 max_stray_pixels: int = 4, color_tolerance: float = 64.0, min_area: int = 12,
                 flat_fraction: float = 0.9) -> list[ParsedImage]:
  """Objects and background cleanliness of uint8 [N, S, S, 3] images (S != 64 resized to 64).

  Args:
    background_tolerance: largest channel difference from the background a
      background pixel may have.
    max_stray_pixels: foreground pixels outside the objects' rims a clean
      background may hold (single-pixel noise no one sees; 0 for none).
    color_tolerance: RGB distance beyond which a pixel is no palette colour.
    min_area: smaller regions are specks (not objects; they dirty the background).
    flat_fraction: share of an object's interior one palette colour must hold.
  """
  canvas = _to_canvas(images)
  if len(canvas) > _CHUNK:  # bounded working memory, and faster: the arrays stay in cache
    options = dict(background_tolerance=background_tolerance, max_stray_pixels=max_stray_pixels,
                   color_tolerance=color_tolerance, min_area=min_area, flat_fraction=flat_fraction)
    return [p for start in range(0, len(canvas), _CHUNK)
            for p in parse_images(canvas[start:start + _CHUNK], **options)]
  offset = np.abs(canvas.astype(np.int16) - np.array(spec_lib.BACKGROUND, np.int16))
  foreground = offset.max(-1) > background_tolerance  # [N, H, W]
  # Nearest references of the foreground pixels only: most pixels are background.
  pixels = canvas[foreground].astype(np.float32)  # [M, 3]
  dist2 = ((pixels[:, None, :] - _REFERENCES) ** 2).sum(-1)  # [M, 7]
  coloured = np.zeros_like(foreground)
  coloured[foreground] = dist2.argmin(-1) != 0
  # Anti-aliased edges blend the background with a palette colour; a tint does not.
  blended = np.zeros_like(foreground)
  blended[foreground] = _blend_distance(pixels) <= background_tolerance
  nearest = dist2[:, 1:].argmin(-1)
  nearest[dist2[:, 1:].min(-1) > color_tolerance**2] = -1
  palette_labels = np.full(foreground.shape, -1, np.int64)
  palette_labels[foreground] = nearest
  components = label_components(coloured)
  # Objects are the components of at least `min_area` pixels; `index` numbers them, -1 elsewhere.
  labelled = components >= 0
  areas = np.bincount(components[labelled], minlength=components.size)  # by label
  keep = areas >= min_area
  index = np.where(labelled, np.where(keep, np.cumsum(keep) - 1, -1)[components], -1)
  areas = areas[keep]
  inside = index >= 0
  dirty = (foreground & ~inside & ~(dilate(inside, _RIM) & blended)).sum((1, 2))
  # Palette colours of each object's interior [objects, 1 + colours] (column 0: no palette
  # colour). Distinct components are never within 2 px of each other without a gap, so
  # eroding their union erodes each. Thin objects keep what they can.
  tables = []
  for radius in (_RIM, 1, 0):
    interior = erode(inside, radius)
    codes = index[interior] * (len(spec_lib.COLORS) + 1) + palette_labels[interior] + 1
    tables.append(np.bincount(codes, minlength=len(areas) * (len(spec_lib.COLORS) + 1))
                  .reshape(len(areas), len(spec_lib.COLORS) + 1))
  table = tables[2]
  for candidate in tables[1::-1]:
    table = np.where(candidate.sum(1, keepdims=True) >= 4, candidate, table)
  dominant = table[:, 1:].argmax(1)
  fractions = table[np.arange(len(areas)), dominant + 1] / np.maximum(table.sum(1), 1)
  # Boxes and images of the objects.
  image_of, ys, xs = np.nonzero(inside)
  owner = index[image_of, ys, xs]
  boxes = np.array([[inside.shape[2], inside.shape[1], 0, 0]] * len(areas)).reshape(-1, 4)
  np.minimum.at(boxes[:, 0], owner, xs)
  np.minimum.at(boxes[:, 1], owner, ys)
  np.maximum.at(boxes[:, 2], owner, xs + 1)
  np.maximum.at(boxes[:, 3], owner, ys + 1)
  images_of = np.zeros(len(areas), np.int64)
  images_of[owner] = image_of
  found = [[] for _ in range(len(canvas))]
  for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
    color = spec_lib.COLORS[dominant[k]]
    n = images_of[k]
    shape = _classify_shape(index[n, y0:y1, x0:x1] == k)
    found[n].append(DetectedObject(color if fractions[k] >= flat_fraction else MIXED, shape,
                                   (x0, y0, x1, y1), int(areas[k]), color, float(fractions[k])))
  return [ParsedImage(sorted(objects, key=lambda o: -o.area), int(d), int(d) <= max_stray_pixels)
          for objects, d in zip(found, dirty)]


def detect_objects(image: np.ndarray, **options) -> list[DetectedObject]:
  """Objects in one uint8 [S, S, 3] image, largest first (options: see `parse_images`)."""
  return parse_images(np.asarray(image)[None], **options)[0].objects


# ----------------------------------------------------------------------------
# Scores.


def _relation(first: DetectedObject, second: DetectedObject) -> str:
  """The relation of `first` to `second` along the axis where they differ most."""
  dx = first.centre[0] - second.centre[0]
  dy = first.centre[1] - second.centre[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def _matches(obj: DetectedObject, want: spec_lib.ObjectSpec) -> tuple[bool, bool]:
  return obj.color == want.color, obj.shape == want.shape


def score(spec: spec_lib.CaptionSpec, parsed: ParsedImage) -> dict[str, bool]:
  """Per-caption agreement: color, shape, position, (size,) count, flat_color, clean_background, all.

  Colour, shape, size and position are judged on the objects that fit the
  caption best; `count` then says whether there were other objects.
  """
  objects = parsed.objects
  result = {"count": len(objects) == spec.num_objects,
            "flat_color": all(o.flat for o in objects),
            "clean_background": parsed.clean_background}
  if spec.num_objects == 1:
    want = spec.objects[0]
    checks = lambda o: (*_matches(o, want), o.size == want.size, o.region == spec.region)  # noqa: E731
    if objects:  # the best-matching object; ties go to the largest
      best = max(objects, key=lambda o: sum(checks(o)))
      result["color"], result["shape"], result["size"], result["position"] = checks(best)
    else:
      result.update(color=False, shape=False, size=False, position=False)
  else:
    candidates = list(itertools.permutations(objects[:4], 2))
    if candidates:
      first, second = max(candidates, key=lambda p: sum(_matches(p[0], spec.objects[0]))
                          + sum(_matches(p[1], spec.objects[1]))
                          + (_relation(*p) == spec.relation))
      (c0, s0), (c1, s1) = _matches(first, spec.objects[0]), _matches(second, spec.objects[1])
      result.update(color=c0 and c1, shape=s0 and s1,
                    position=_relation(first, second) == spec.relation)
    else:
      result.update(color=False, shape=False, position=False)
  result["all"] = all(result.values())
  return result


_GROUPS = {
    "all": lambda s: True,
    "single": lambda s: s.num_objects == 1,
    "two": lambda s: s.num_objects == 2,
    "held_out": lambda s: s.has_held_out_pair,
    "seen": lambda s: not s.has_held_out_pair,
}
# Plainer names for the two-object scores, and the whole-set image checks.
_ALIASES = {
    "two/both_colors": "two/color",
    "two/both_shapes": "two/shape",
    "two/relation": "two/position",
    "clean_background": "all/clean_background",
    "flat_color": "all/flat_color",
}


def evaluate(images: np.ndarray, captions, **options) -> dict:
  """Scores images against their captions.

  Args:
    images: uint8 [N, S, S, 3]; S != 64 is resized to 64.
    captions: N `shapes` captions (str or bytes).
    **options: see `parse_images`.

  Returns:
    {"metrics": {name: fraction correct}, "counts": {name: number correct},
     "totals": {group: captions}, "details": [per caption], "num_images": N}.
    Names are "<group>/<score>". Groups: all, single, two, held_out (a caption
    object is a held-out pair), seen; empty groups are left out. Scores (see
    `score`): color, shape, position (region, or relation for two objects),
    size (one object), count, flat_color, clean_background, and all (every
    score of the caption). Aliases: two/both_colors, two/both_shapes,
    two/relation, clean_background, flat_color (of all images).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected uint8 [N, S, S, 3] images, got {images.dtype} {images.shape}")
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  specs = [spec_lib.parse_caption(c) for c in captions]
  details = [{"caption": spec_lib.caption_of(s), "spec": s, "objects": p.objects,
              "dirty_pixels": p.dirty_pixels, "scores": score(s, p)}
             for s, p in zip(specs, parse_images(images, **options) if len(images) else [])]
  metrics, counts, totals = {}, {}, {}
  for group, member in _GROUPS.items():
    rows = [d["scores"] for d in details if member(d["spec"])]
    if not rows:
      continue
    totals[group] = len(rows)
    for key in sorted({k for r in rows for k in r}):
      values = [r[key] for r in rows if key in r]
      counts[f"{group}/{key}"] = int(np.sum(values))
      metrics[f"{group}/{key}"] = float(np.mean(values))
  for alias, name in _ALIASES.items():
    if name in metrics:
      metrics[alias], counts[alias] = metrics[name], counts[name]
  return {"metrics": metrics, "counts": counts, "totals": totals, "details": details,
          "num_images": len(details)}
