"""The `shapes` data set: TFDS build without TensorFlow, and the spec (the evaluator: test_shapes_eval.py)."""

import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import shapes

# Palette and background from DESIGN.md, restated so a change to the module is caught.
DESIGN_PALETTE = {
    "red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220),
    "yellow": (230, 200, 40), "purple": (150, 70, 190), "orange": (240, 140, 40),
}
DESIGN_BACKGROUND = (245, 245, 245)
HELD_OUT = {("green", "triangle"), ("purple", "circle")}
# Independent of shapes.parse_caption: the grammar of DESIGN.md and its articles.
COLOR = "(red|green|blue|yellow|purple|orange)"
SHAPE = "(circle|square|triangle)"
SINGLE = re.compile(rf"a (small|large) {COLOR} {SHAPE} "
                    r"(at the top|at the bottom|on the left|on the right|in the center)")
OBJECT = rf"(a|an) {COLOR} {SHAPE}"
PAIR = re.compile(rf"{OBJECT} (to the left of|to the right of|above|below) {OBJECT}")


@pytest.fixture(scope="module")
def test_examples():
  return [shapes.generate_example("test", i) for i in range(300)]


@pytest.fixture(scope="module")
def train_examples():
  return [shapes.generate_example("train", i) for i in range(600)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  shapes.shapes_builder(str(data_dir), train_size=128, test_size=64).download_and_prepare()
  return str(data_dir)


# ----------------------------------------------------------------------------
# TFDS builder.


def test_builder_reads_back_without_tensorflow(tiny_dir):
  splits = tfds.data_source("shapes/tiny", data_dir=tiny_dir)
  assert (len(splits["train"]), len(splits["test"])) == (128, 64)
  for split, index in [("train", 0), ("train", 77), ("test", 63)]:
    record = splits[split][index]
    expected = shapes.generate_example(split, index)
    assert record["image"].dtype == np.uint8 and record["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal(record["image"], expected["image"])
    assert record["caption"].decode() == expected["caption"]
    for key in ("num_objects", "colors", "shapes", "boxes", "size", "region", "relation", "held_out"):
      np.testing.assert_array_equal(record[key], expected[key], err_msg=key)
  assert "tensorflow" not in sys.modules


def test_custom_sizes_hold_a_prefix_of_the_full_data(tmp_path):
  builder = shapes.shapes_builder(str(tmp_path), train_size=10, test_size=3)
  builder.download_and_prepare()
  splits = builder.as_data_source()
  assert builder.builder_config.name == "train10_test3"
  assert (len(splits["train"]), len(splits["test"])) == (10, 3)
  for index in range(10):
    assert splits["train"][index]["caption"].decode() == shapes.generate_example("train", index)["caption"]


# ----------------------------------------------------------------------------
# The spec.


def _colours(image):
  return {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}


def test_palette_background_and_flat_colours(train_examples):
  assert shapes.PALETTE == DESIGN_PALETTE and shapes.BACKGROUND == DESIGN_BACKGROUND
  for ex in train_examples:
    image = ex["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    wanted = {DESIGN_BACKGROUND} | {DESIGN_PALETTE[shapes.COLORS[c]] for c in ex["colors"] if c >= 0}
    assert _colours(image) == wanted


def _geometry_ok(image, colour, shape, box):
  """Pixels of `colour` inside `box` fill it as the shape should (tight box, fill ratio, apex up)."""
  x0, y0, x1, y1 = box
  mask = (image[y0:y1, x0:x1] == colour).all(-1)
  ys, xs = np.nonzero(mask)
  side = x1 - x0
  if (xs.min(), ys.min(), xs.max(), ys.max()) != (0, 0, side - 1, side - 1):
    return False  # the box is not tight
  fill = mask.mean()
  if shape == "square":
    return mask.all()
  if shape == "circle":  # area pi/4, touches all four sides, symmetric
    return (abs(fill - np.pi / 4) < 0.05 and mask[0].any() and mask[:, 0].any()
            and (mask == mask[::-1]).all() and (mask == mask[:, ::-1]).all())
  # triangle: area ~1/2, apex at the top centre, full base, widths grow downwards
  widths = mask.sum(1)
  return (0.5 < fill < 0.6 and widths[-1] == side and widths[0] <= 2
          and (np.diff(widths) >= 0).all() and (mask == mask[:, ::-1]).all())


def test_objects_sizes_regions_and_shapes(train_examples, test_examples):
  for ex in train_examples + test_examples:
    spec = shapes.parse_caption(ex["caption"])
    boxes = ex["boxes"][: spec.num_objects]
    for obj, box in zip(spec.objects, boxes):
      x0, y0, x1, y1 = (int(v) for v in box)
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == y1 - y0
      assert _geometry_ok(ex["image"], DESIGN_PALETTE[obj.color], obj.shape, box), ex["caption"]
    if spec.num_objects == 2:
      assert all(b[2] - b[0] == 16 for b in boxes)
      continue
    (x0, y0, x1, y1), = boxes
    side, cx, cy = x1 - x0, (x0 + x1) / 2, (y0 + y1) / 2
    lo, hi = {"small": (14, 18), "large": (26, 32)}[spec.objects[0].size]
    assert lo <= side <= hi
    ranges = {"on the left": ((12, 20), (28, 36)), "on the right": ((44, 52), (28, 36)),
              "at the top": ((28, 36), (12, 20)), "at the bottom": ((28, 36), (44, 52)),
              "in the center": ((29, 35), (29, 35))}[spec.region]
    for centre, (rlo, rhi), start, end in ((cx, ranges[0], x0, x1), (cy, ranges[1], y0, y1)):
      # Inside the range, or moved inward just enough to touch the canvas edge.
      inside = rlo <= centre <= rhi
      assert inside or (centre < rlo and start == 0) or (centre > rhi and end == 64), ex["caption"]
      assert side / 2 <= centre <= 64 - side / 2


def test_two_objects_differ_and_keep_their_relation(test_examples):
  pairs = [shapes.parse_caption(ex["caption"]) for ex in test_examples[1::2]]
  for ex, spec in zip(test_examples[1::2], pairs):
    a, b = spec.objects
    assert (a.color, a.shape) != (b.color, b.shape)
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = ex["boxes"]
    dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    along, across = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                     "above": (-dy, dx), "below": (dy, dx)}[spec.relation]
    assert along >= 20 and abs(across) <= 10, ex["caption"]
  assert {s.relation for s in pairs} == {"to the left of", "to the right of", "above", "below"}


def test_caption_grammar_and_half_single_half_pairs(train_examples, test_examples):
  for split_examples in (train_examples, test_examples):
    for index, ex in enumerate(split_examples):
      caption = ex["caption"]
      if index % 2 == 0:
        assert SINGLE.fullmatch(caption), caption
        assert ex["num_objects"] == 1
      else:
        m = PAIR.fullmatch(caption)
        assert m, caption
        assert m[1] == ("an" if m[2] == "orange" else "a") and m[5] == ("an" if m[6] == "orange" else "a")
        assert ex["num_objects"] == 2


def test_held_out_pairs_never_in_train_but_in_test():
  for index in range(10_000):  # a fifth of train, both kinds of example
    for obj in shapes.sample_scene("train", index).spec.objects:
      assert (obj.color, obj.shape) not in HELD_OUT, index
  test = [shapes.sample_scene("test", i).spec for i in range(2000)]
  held = [s for s in test if any((o.color, o.shape) in HELD_OUT for o in s.objects)]
  assert any(s.num_objects == 1 for s in held) and any(s.num_objects == 2 for s in held)
  for pair in HELD_OUT:
    assert any((o.color, o.shape) == pair for s in held for o in s.objects)
  # the labels agree
  assert shapes.generate_example("test", test.index(held[0]))["held_out"]


def test_deterministic_and_order_free():
  later = shapes.generate_example("train", 31)
  for i in range(5):
    shapes.generate_example("test", i)
  again = shapes.generate_example("train", 31)
  np.testing.assert_array_equal(later["image"], again["image"])
  assert later["caption"] == again["caption"]
  # splits and neighbouring indices differ
  captions = {shapes.generate_example(split, i)["caption"] for split in ("train", "test")
              for i in range(20)}
  assert len(captions) >= 38


def test_parse_caption():
  spec = shapes.parse_caption("An orange square to the LEFT of a blue triangle.")
  assert spec == shapes.CaptionSpec(
      (shapes.ObjectSpec("orange", "square"), shapes.ObjectSpec("blue", "triangle")),
      relation="to the left of")
  assert spec.num_objects == 2 and not spec.has_held_out_pair
  spec = shapes.parse_caption(b"a small purple circle in the center")
  assert spec.objects[0] == shapes.ObjectSpec("purple", "circle", "small")
  assert spec.region == "in the center" and spec.has_held_out_pair
  for bad in ("a pink circle on the left", "a red circle", "two red squares", ""):
    with pytest.raises(ValueError):
      shapes.parse_caption(bad)


def test_caption_round_trip(test_examples):
  for ex in test_examples:
    assert shapes.caption_of(shapes.parse_caption(ex["caption"])) == ex["caption"]
