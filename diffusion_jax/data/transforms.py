"""Image conversions shared by the data sources: any PIL image -> RGB uint8, square crops."""

from __future__ import annotations

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


def resize_and_center_crop(image: Image.Image | np.ndarray, size: int,
                           resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
  """Resizes the shorter side to `size` and crops the centre: uint8 [size, size, 3]."""
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
