"""The `shapes` evaluator: perfect on the data set's own images, and strict about each defect."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusion_jax.data import shapes, shapes_eval

BACKGROUND = np.array(shapes.BACKGROUND)
CHECKS = ("color", "shape", "position", "count", "flat_color", "clean_background", "all")


@pytest.fixture(scope="module")
def test_examples():
  return [shapes.generate_example("test", i) for i in range(shapes.SPLIT_SIZES["test"])]


def _batch(examples):
  return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


def _wrong(scores):
  return {k for k, ok in scores.items() if not ok}


def test_importing_the_evaluator_does_not_import_tfds():
  code = ("import sys, diffusion_jax.data.shapes_eval, diffusion_jax.data.shapes_spec; "
          "assert 'tensorflow_datasets' not in sys.modules, 'tensorflow_datasets imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_label_components_matches_a_flood_fill():
  rng = np.random.default_rng(0)
  masks = rng.random((4, 23, 17)) < 0.45
  labels = shapes_eval.label_components(masks)
  for mask, label in zip(masks, labels):
    seen = np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
      if seen[start]:
        continue
      stack, component = [start], set()
      seen[start] = True
      while stack:  # 8-neighbour flood fill
        y, x = stack.pop()
        component.add((y, x))
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            q = (y + dy, x + dx)
            if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
              seen[q] = True
              stack.append(q)
      assert len({int(label[p]) for p in component}) == 1
      assert (label == label[start]).sum() == len(component)
  assert (labels[~masks] == -1).all()
  assert len(np.unique(labels[masks])) == sum(len(np.unique(l[l >= 0])) for l in labels)


def test_perfect_on_the_whole_test_split(test_examples):
  images, captions = _batch(test_examples)
  result = shapes.evaluate(images, captions)
  assert result["num_images"] == len(test_examples) == 2000
  assert result["totals"] == {"all": 2000, "single": 1000, "two": 1000, "held_out": 330, "seen": 1670}
  for key, value in result["metrics"].items():
    assert value >= 0.99, key
  assert result["metrics"]["all/all"] == 1.0
  for key in ("single/color", "single/shape", "single/position", "single/size", "two/both_colors",
              "two/both_shapes", "two/relation", "two/all", "held_out/color", "held_out/shape",
              "clean_background", "flat_color", "all/color"):
    assert result["counts"][key] == result["totals"][key.split("/")[0] if "/" in key else "all"], key
  # Detections agree with the labels.
  for ex, detail in zip(test_examples[:100], result["details"]):
    boxes = {tuple(int(v) for v in b) for b in ex["boxes"][: ex["num_objects"]]}
    assert {o.box for o in detail["objects"]} == boxes
    assert all(o.flat and o.color_fraction == 1.0 for o in detail["objects"])


# ----------------------------------------------------------------------------
# Each defect fails exactly its own check.


def _singles(examples, keep=lambda spec: True, count=30):
  chosen = [e for e in examples[0::2] if keep(shapes.parse_caption(e["caption"]))]
  return chosen[:count]


def _assert_only_wrong(images, captions, expected):
  details = shapes.evaluate(np.stack(images), captions)["details"]
  assert len(details) >= 10
  for d in details:
    assert _wrong(d["scores"]) == expected | {"all"}, (d["caption"], d["scores"], d["objects"])


def test_mixed_colour_object_is_wrong_on_colour(test_examples):
  # A blue (or, for blue circles, red) disk in the middle of a large circle.
  chosen = _singles(test_examples, lambda s: s.objects[0].shape == "circle" and s.objects[0].size == "large")
  images = []
  for ex in chosen:
    image = ex["image"].copy()
    x0, y0, x1, y1 = ex["boxes"][0]
    cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4
    ys, xs = np.mgrid[:64, :64] + 0.5
    disk = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    inner = "red" if shapes.COLORS[ex["colors"][0]] == "blue" else "blue"
    image[disk] = shapes.PALETTE[inner]
    images.append(image)
  _assert_only_wrong(images, [e["caption"] for e in chosen], {"color", "flat_color"})
  mixed = shapes.detect_objects(images[0])
  assert len(mixed) == 1 and mixed[0].color == shapes_eval.MIXED and not mixed[0].flat


def test_tinted_textured_square_behind_the_object_dirties_the_background(test_examples):
  rng = np.random.default_rng(1)
  chosen = _singles(test_examples)
  images = []
  for ex in chosen:
    image = ex["image"].copy()
    x0, y0, x1, y1 = ex["boxes"][0]
    # From the object's centre towards the canvas centre, so it shows beside large objects too.
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    xs = slice(cx, cx + 30) if cx < 32 else slice(cx - 30, cx)
    ys = slice(cy, cy + 30) if cy < 32 else slice(cy - 30, cy)
    patch = np.s_[ys, xs]
    region = image[patch]
    behind = (region == BACKGROUND).all(-1)  # the object stays in front
    tint = BACKGROUND - 20 + rng.normal(0, 3, region.shape)  # 20 levels darker, with texture
    region[behind] = np.clip(tint, 0, 255).astype(np.uint8)[behind]
    images.append(image)
  _assert_only_wrong(images, [e["caption"] for e in chosen], {"clean_background"})


def test_a_duplicated_object_is_wrong_on_count(test_examples):
  chosen = _singles(test_examples, lambda s: s.objects[0].size == "small")
  images = []
  for ex in chosen:
    image = ex["image"].copy()
    x0, y0, x1, y1 = (int(v) for v in ex["boxes"][0])
    side = x1 - x0
    # A copy in the free corner farthest from the object.
    tx = 2 if x0 > 32 - side / 2 else 62 - side
    ty = 2 if y0 > 32 - side / 2 else 62 - side
    image[ty:ty + side, tx:tx + side] = ex["image"][y0:y1, x0:x1]
    images.append(image)
  _assert_only_wrong(images, [e["caption"] for e in chosen], {"count"})


def test_recoloured_second_object_is_wrong_on_colour(test_examples):
  chosen = test_examples[1:80:2]
  images = []
  for ex in chosen:
    image = ex["image"].copy()
    c0, c1 = (shapes.COLORS[c] for c in ex["colors"])
    x0, y0, x1, y1 = ex["boxes"][1]
    new = next(c for c in shapes.COLORS if c not in (c0, c1))
    box = image[y0:y1, x0:x1]
    box[(box == shapes.PALETTE[c1]).all(-1)] = shapes.PALETTE[new]
    images.append(image)
  _assert_only_wrong(images, [e["caption"] for e in chosen], {"color"})
  metrics = shapes.evaluate(np.stack(images), [e["caption"] for e in chosen])["metrics"]
  assert metrics["two/both_colors"] == 0 and metrics["two/both_shapes"] == 1 and metrics["two/relation"] == 1


def test_specks_and_noise_dirty_the_background_only(test_examples):
  images, captions = _batch(test_examples[:120])
  rng = np.random.default_rng(0)
  specks = images.copy()
  specks[:, rng.integers(0, 64, 30), rng.integers(0, 64, 30)] = (0, 0, 0)  # 30 dark pixels
  noisy = np.clip(images + rng.normal(0, 10, images.shape), 0, 255).astype(np.uint8)
  for name, batch in [("specks", specks), ("noisy", noisy)]:
    metrics = shapes.evaluate(batch, captions)["metrics"]
    assert metrics["clean_background"] < 0.05, name
    for key in ("color", "shape", "position", "count", "flat_color"):
      assert metrics[f"all/{key}"] >= 0.97, (name, key)
  # A couple of stray pixels are not a dirty background.
  stray = images.copy()
  stray[:, 1, 1] = stray[:, 62, 3] = (0, 0, 0)
  assert shapes.evaluate(stray, captions)["metrics"]["all/all"] == 1.0


def test_tolerates_blur_and_other_sizes(test_examples):
  images, captions = _batch(test_examples[:120])
  blurred = np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.0)))
                      for i in images])
  upscaled = np.stack([np.asarray(Image.fromarray(i).resize((256, 256), Image.BICUBIC))
                       for i in images])
  for name, batch in [("blurred", blurred), ("upscaled", upscaled)]:
    assert shapes.evaluate(batch, captions)["metrics"]["all/all"] >= 0.97, name


def test_low_on_shuffled_captions(test_examples):
  images, captions = _batch(test_examples[:300])
  shuffled = list(np.random.default_rng(0).permutation(captions))
  metrics = shapes.evaluate(images, shuffled)["metrics"]
  assert metrics["all/all"] < 0.1
  assert metrics["all/color"] < 0.3 and metrics["all/position"] < 0.4


def test_scores_position_on_mirrored_images(test_examples):
  # Mirroring keeps colours and (symmetric) shapes but swaps left and right.
  images, captions = _batch(test_examples[:300])
  details = shapes.evaluate(images[:, :, ::-1], captions)["details"]
  for d in details:
    assert d["scores"]["color"] and d["scores"]["shape"]
    sideways = d["spec"].region in ("on the left", "on the right") or d["spec"].relation in (
        "to the left of", "to the right of")
    assert d["scores"]["position"] != sideways, d["caption"]


def test_rejects_bad_input():
  with pytest.raises(ValueError):
    shapes.evaluate(np.zeros((2, 64, 64, 3), np.float32), ["a small red circle on the left"] * 2)
  with pytest.raises(ValueError):
    shapes.evaluate(np.zeros((2, 64, 64, 3), np.uint8), ["a small red circle on the left"])
  empty = shapes.evaluate(np.full((1, 64, 64, 3), 245, np.uint8), ["a small red circle on the left"])
  assert empty["metrics"]["all/count"] == 0 and empty["metrics"]["clean_background"] == 1
