"""Image conversions: any PIL image -> RGB uint8, square crops, uint8 <-> model pixels in [-1, 1].

The one place for these; the data sources, the pipeline and the training code use them.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are composited over white, the usual page background.
_MATTE = (255, 255, 255)


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
  """16/32-bit integer grayscale ("I;16*", "I") -> 8-bit, keeping the top 8 bits of 16."""
  values = np.asarray(image).astype(np.float64)
  values = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
  return Image.fromarray(values, "L").convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
  """32-bit float grayscale ("F"): [0, 1] when the maximum is at most 1, else [0, 255]."""
  values = np.asarray(image).astype(np.float64)
  if np.nanmax(values, initial=0.0) <= 1.0:
    values = values * 255.0
  values = np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8)
  return Image.fromarray(values, "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image -> an "RGB" (8 bits per channel) image.

  Applies the EXIF orientation, composites transparency (alpha channels and
  palette transparency) over white, and rescales 16-bit and float grayscale
  rather than clipping it, which `Image.convert("RGB")` would do.
  """
  image = ImageOps.exif_transpose(image)
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    return _sixteen_bit_to_rgb(image)
  if mode == "F":
    return _float_to_rgb(image)
  if mode == "P" and "transparency" in image.info:
    image, mode = image.convert("RGBA"), "RGBA"
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    matte = Image.new("RGBA", rgba.size, _MATTE + (255,))
    return Image.alpha_composite(matte, rgba).convert("RGB")
  return image.convert("RGB") if mode != "RGB" else image


def resize_center_crop(image: Image.Image | np.ndarray, size: int,
                       resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
  """Resizes the shorter side to `size` and crops the centre: uint8 [size, size, 3].

  `image` is a PIL image (any mode, see `to_rgb`) or a uint8 array [H, W], [H, W, 1] or [H, W, 3].
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  image = to_rgb(image)
  width, height = image.size
  scale = size / min(width, height)
  # Round, and never below `size`, so the crop always fits.
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), resample)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def to_model_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the range the autoencoder reads and writes."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def to_uint8(pixels, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Float pixels in `value_range` ((-1, 1) for the model, (0, 1) for images) -> uint8, clipped and rounded.

  uint8 input is returned unchanged.
  """
  pixels = np.asarray(pixels)
  if pixels.dtype == np.uint8:
    return pixels
  low, high = value_range
  scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
  return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
  """A user's image(s) -> uint8 [N, H, W, 3].

  Accepts a path, a PIL image (any mode, see `to_rgb`), an array (uint8, or
  float in [0, 1]), or a list of those of one size. Grayscale arrays ([H, W],
  [..., 1]) are repeated to RGB; [H, W, 3] gains a batch axis. Raises
  ValueError naming `name` otherwise.
  """
  if isinstance(image, (list, tuple)) and image and all(
      isinstance(i, (str, os.PathLike, Image.Image, np.ndarray)) for i in image):
    arrays = [as_rgb_uint8(item, name) for item in image]
    if len({a.shape[1:] for a in arrays}) > 1:
      raise ValueError(f"{name}: images of different sizes {[a.shape[1:3] for a in arrays]}")
    return np.concatenate(arrays)
  if isinstance(image, (str, os.PathLike)):
    try:
      with Image.open(image) as opened:
        image = to_rgb(opened)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read {name} {os.fspath(image)!r}: {e}") from None
  if isinstance(image, Image.Image):
    image = to_rgb(image)
  image = np.asarray(image)
  if image.dtype == bool or not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
    raise ValueError(f"{name} must be uint8 or float in [0, 1], got {image.dtype}")
  image = to_uint8(image, (0.0, 1.0))
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim in (3, 4) and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be [N, H, W, 3] RGB, got shape {image.shape}")
  return image
