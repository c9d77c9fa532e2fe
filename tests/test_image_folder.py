"""Image folders: captions from metadata.jsonl or .txt files, conversions, and bad data."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import image_folder, pipeline
from diffusion_jax.data.image_folder import ImageFolderError, ImageFolderSource

SIZE = 16
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _save(path, image, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


def _good_images(root):
  """Images of every mode, with the RGB uint8 each must become."""
  gray = RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
  gray16 = RNG.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
  rgba = np.dstack([RGB, RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)])
  palette_img = Image.fromarray(RGB).quantize(8)
  transparent = palette_img.copy()
  transparent.info["transparency"] = 0
  palette_rgb = np.asarray(palette_img.convert("RGB"))
  alpha = rgba[..., 3:].astype(np.float64) / 255
  expected_rgba = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha))
  transparent_rgb = palette_rgb.copy()
  transparent_rgb[np.asarray(palette_img) == 0] = 255  # index 0 is transparent: white
  bilevel = gray > 127
  cases = {
      "rgb.png": (Image.fromarray(RGB), RGB),
      "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
      "gray16.png": (Image.fromarray(gray16), np.repeat(np.round(gray16 / 257)[..., None], 3, -1)),
      "rgba.png": (Image.fromarray(rgba), expected_rgba),
      "palette.png": (palette_img, palette_rgb),
      "palette_transparent.png": (transparent, transparent_rgb),
      "bilevel.png": (Image.fromarray(bilevel), np.repeat(bilevel[..., None] * 255, 3, -1)),
      "sub/nested.bmp": (Image.fromarray(RGB), RGB),
  }
  for name, (image, _) in cases.items():
    _save(root / name, image)
  assert Image.open(root / "gray16.png").mode.startswith("I")  # really 16-bit on disk
  return {name: expected for name, (_, expected) in cases.items()}


def _corrupt_images(root):
  png = root / "rgb.png"
  (root / "truncated.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
  (root / "garbage.jpg").write_bytes(b"not an image at all" * 10)


def _metadata_folder(root, outside):
  expected = _good_images(root)
  _corrupt_images(root)
  os.symlink(outside, root / "escape.png")
  lines = [json.dumps({"file_name": name, "text": f"caption of {name}"}) for name in expected]
  bad = {
      "bad_json": ['{"file_name": "rgb.png", "text": ', "[1, 2]"],
      "bad_encoding": [b'{"file_name": "rgb.png", "text": "caf\xe9"}'],
      "no_file_name": ['{"text": "no file"}', '{"file_name": 3, "text": "x"}'],
      "unsafe_path": [json.dumps({"file_name": n, "text": "x"})
                      for n in ("../../etc/passwd", "/etc/passwd", "escape.png", "sub/../../x.png")],
      "missing_image": ['{"file_name": "nowhere.png", "text": "x"}'],
      "missing_caption": ['{"file_name": "rgb.png"}', '{"file_name": "rgb.png", "text": "  "}',
                          '{"file_name": "rgb.png", "text": null}'],
      "corrupt_image": ['{"file_name": "truncated.png", "text": "x"}',
                        '{"file_name": "garbage.jpg", "text": "x"}'],
  }
  with open(root / "metadata.jsonl", "wb") as f:
    for line in lines + [l for ls in bad.values() for l in ls]:
      f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
  counts = {reason: len(ls) for reason, ls in bad.items()}
  return expected, counts


@pytest.fixture
def outside(tmp_path):
  path = tmp_path / "outside.png"
  Image.fromarray(RGB).save(path)
  return path


def test_metadata_folder_converts_every_mode_and_skips_bad_entries(tmp_path, outside):
  root = tmp_path / "folder"
  expected, counts = _metadata_folder(root, outside)
  with pytest.warns(UserWarning) as caught:
    source = ImageFolderSource(root, image_size=SIZE)
  assert len(caught) == 1  # one summary
  message = str(caught[0].message)
  for reason, n in counts.items():
    assert f"{n} {reason}" in message
  assert {r: sum(s.reason == r for s in source.skipped) for r in counts} == counts
  assert len(source) == len(expected)
  for index, (name, want) in enumerate(expected.items()):
    record = source[index]
    assert record["caption"] == f"caption of {name}"
    assert record["image"].dtype == np.uint8 and record["image"].shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(record["image"], want, atol=1, err_msg=name)


@pytest.mark.parametrize("reason", list(image_folder.REASONS))
def test_strict_names_the_file_and_line(tmp_path, outside, reason):
  root = tmp_path / "folder"
  _good_images(root)
  _corrupt_images(root)
  os.symlink(outside, root / "escape.png")
  line = {
      "bad_json": b"{not json",
      "bad_encoding": b'{"file_name": "rgb.png", "text": "\xff\xfe"}',
      "no_file_name": b'{"text": "x"}',
      "unsafe_path": b'{"file_name": "escape.png", "text": "x"}',
      "missing_image": b'{"file_name": "nowhere.png", "text": "x"}',
      "missing_caption": b'{"file_name": "gray.png", "text": ""}',
      "corrupt_image": b'{"file_name": "truncated.png", "text": "x"}',
  }[reason]
  (root / "metadata.jsonl").write_bytes(b'{"file_name": "rgb.png", "text": "fine"}\n\n' + line + b"\n")
  with pytest.raises(ImageFolderError, match="line 3") as error:
    ImageFolderSource(root, image_size=SIZE, strict=True)
  assert image_folder.REASONS[reason] in str(error.value)
  if reason in ("unsafe_path", "missing_image", "missing_caption", "corrupt_image"):
    assert {"unsafe_path": "escape.png", "missing_image": "nowhere.png",
            "missing_caption": "gray.png", "corrupt_image": "truncated.png"}[reason] in str(error.value)


def test_caption_files_beside_images(tmp_path, outside):
  root = tmp_path / "folder"
  expected = _good_images(root)
  for name in expected:
    (root / name).with_suffix(".txt").write_text(f"  text of {name}\n", encoding="utf-8")
  _corrupt_images(root)
  (root / "truncated.txt").write_text("x")
  (root / "garbage.txt").write_text("x")
  Image.fromarray(RGB).save(root / "no_caption.png")
  Image.fromarray(RGB).save(root / "empty_caption.png")
  (root / "empty_caption.txt").write_text(" \n")
  Image.fromarray(RGB).save(root / "latin1.png")
  (root / "latin1.txt").write_bytes("café".encode("latin-1"))
  os.symlink(outside, root / "escape.png")
  (root / "escape.txt").write_text("x")
  with pytest.warns(UserWarning, match="skipped 6 of 14"):
    source = ImageFolderSource(root, image_size=SIZE)
  reasons = sorted(s.reason for s in source.skipped)
  assert reasons == ["bad_encoding", "corrupt_image", "corrupt_image", "missing_caption",
                     "missing_caption", "unsafe_path"]
  by_caption = {source[i]["caption"]: source[i]["image"] for i in range(len(source))}
  assert set(by_caption) == {f"text of {name}" for name in expected}
  for name, want in expected.items():
    np.testing.assert_allclose(by_caption[f"text of {name}"], want, atol=1, err_msg=name)
  with pytest.raises(ImageFolderError, match="latin1.txt|no_caption.png|empty_caption.txt"):
    ImageFolderSource(root, image_size=SIZE, strict=True)


def test_resize_shorter_side_then_centre_crop(tmp_path):
  root = tmp_path / "folder"
  # 48 wide, 24 high: no resize needed for 24, the centre 24 columns are kept.
  wide = np.arange(48 * 24 * 3, dtype=np.uint32).reshape(24, 48, 3).astype(np.uint8)
  _save(root / "wide.png", Image.fromarray(wide))
  # 20 wide, 60 high -> 24 x 72 after resizing; a flat colour stays flat.
  _save(root / "tall.png", Image.new("RGB", (20, 60), (10, 200, 30)))
  (root / "metadata.jsonl").write_text(
      '{"file_name": "wide.png", "text": "w"}\n{"file_name": "tall.png", "text": "t"}\n')
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a clean folder warns about nothing
    source = ImageFolderSource(root, image_size=24)
  np.testing.assert_array_equal(source[0]["image"], wide[:, 12:36])
  tall = source[1]["image"]
  assert tall.shape == (24, 24, 3) and (tall == (10, 200, 30)).all()


def test_is_a_grain_source(tmp_path):
  root = tmp_path / "folder"
  expected = _good_images(root)
  (root / "metadata.jsonl").write_text(
      "".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in expected))
  source = pickle.loads(pickle.dumps(ImageFolderSource(root, image_size=SIZE)))
  batches = pipeline.make_dataset(source, batch_size=4, shuffle=False, num_epochs=1,
                                  process_index=0, process_count=1)
  batch = next(batches)
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert list(batch["caption"]) == list(expected)[:4]
