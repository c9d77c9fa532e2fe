"""A folder of captioned images as a random-access source (grain-compatible).

Captions come from `metadata.jsonl` in the folder's root (one JSON object per
line with `file_name` and `text`, the convention of diffusers' and HF
datasets' image folders), or otherwise from a `.txt` file beside each image
(`cat.png` + `cat.txt`).

Bad entries are found when the folder is opened and skipped with one warning
that counts them by reason; with `strict=True` the first one raises
`ImageFolderError` naming the file (and the metadata line).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_jax.data import transforms

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


class ImageFolderError(ValueError):
  """A bad entry in an image folder opened with `strict=True`."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """One skipped entry: where, and why."""

  path: str
  line: int | None  # 1-based line of metadata.jsonl, None for .txt captions
  reason: str  # a key of `REASONS`
  detail: str


REASONS = {
    "bad_json": "metadata line is not a JSON object",
    "bad_encoding": "text is not UTF-8",
    "no_file_name": "metadata line has no string `file_name`",
    "unsafe_path": "file_name leaves the folder (absolute, '..' or a symlink out)",
    "missing_image": "image file does not exist",
    "missing_caption": "caption is missing or empty",
    "corrupt_image": "image cannot be decoded (corrupt or truncated)",
}


def _caption_text(value) -> str | None:
  """A non-empty caption from a metadata value (a string, or the first non-empty of a list)."""
  if isinstance(value, (list, tuple)):
    value = next((v for v in value if isinstance(v, str) and v.strip()), None)
  if isinstance(value, str) and value.strip():
    return value.strip()
  return None


def _load_image(path: Path) -> Image.Image:
  """Decodes the whole file, so truncation is caught here rather than later."""
  with Image.open(path) as image:
    image.load()
    return image.copy()


class ImageFolderSource:
  """Random access to {"image": uint8 [size, size, 3], "caption": str} records.

  Implements `__len__` and `__getitem__`, so it is a grain
  `RandomAccessDataSource`; it holds only paths and strings, so it pickles
  into grain worker processes.
  """

  def __init__(self, root: str | os.PathLike, *, image_size: int, caption_key: str = "text",
               strict: bool = False, verify_images: bool = True,
               resample: int = Image.Resampling.BICUBIC):
    """Scans the folder.

    Args:
      root: the folder.
      image_size: output side; images are resized (shorter side) and centre-cropped.
      caption_key: the metadata.jsonl key holding the caption.
      strict: raise `ImageFolderError` on the first bad entry instead of skipping.
      verify_images: decode every image now, so corrupt files are skipped up front.
    """
    self.root = Path(root).resolve()
    if not self.root.is_dir():
      raise FileNotFoundError(f"No image folder at {root}")
    self.image_size = image_size
    self.caption_key = caption_key
    self.strict = strict
    self.resample = resample
    self.skipped: list[Skipped] = []
    if (self.root / METADATA_FILE).exists():
      entries = self._scan_metadata()
    else:
      entries = self._scan_caption_files()
    if verify_images:
      entries = [e for e in entries if self._decodes(*e)]
    self._paths = [str(path) for path, _, _ in entries]
    self._captions = [caption for _, caption, _ in entries]
    if self.skipped:
      counts = collections.Counter(s.reason for s in self.skipped)
      summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
      warnings.warn(f"{self.root}: skipped {len(self.skipped)} of "
                    f"{len(self.skipped) + len(self)} entries ({summary}); "
                    "see `.skipped` for each one.", stacklevel=2)

  # -- scanning ---------------------------------------------------------------

  def _skip(self, path, line: int | None, reason: str, detail: str = "") -> None:
    where = f"{path}" + (f" ({METADATA_FILE} line {line})" if line is not None else "")
    if self.strict:
      raise ImageFolderError(f"{where}: {REASONS[reason]}" + (f": {detail}" if detail else ""))
    self.skipped.append(Skipped(str(path), line, reason, detail))

  def _inside(self, relative: str) -> Path | None:
    """The resolved path of `relative` if it stays inside the folder (symlinks followed)."""
    if os.path.isabs(relative):
      return None
    path = (self.root / relative).resolve()
    return path if path.is_relative_to(self.root) else None

  def _scan_metadata(self) -> list[tuple[Path, str, int | None]]:
    metadata = self.root / METADATA_FILE
    entries = []
    with open(metadata, "rb") as f:
      for line_number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
          self._skip(metadata, line_number, "bad_encoding", str(e))
          continue
        except json.JSONDecodeError as e:
          self._skip(metadata, line_number, "bad_json", str(e))
          continue
        if not isinstance(record, dict):
          self._skip(metadata, line_number, "bad_json", f"got {type(record).__name__}")
          continue
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
          self._skip(metadata, line_number, "no_file_name")
          continue
        path = self._inside(file_name)
        if path is None:
          self._skip(file_name, line_number, "unsafe_path")
          continue
        if not path.is_file():
          self._skip(file_name, line_number, "missing_image")
          continue
        caption = _caption_text(record.get(self.caption_key))
        if caption is None:
          self._skip(file_name, line_number, "missing_caption", f"key {self.caption_key!r}")
          continue
        entries.append((path, caption, line_number))
    return entries

  def _scan_caption_files(self) -> list[tuple[Path, str, int | None]]:
    entries = []
    for directory, subdirs, files in os.walk(self.root):  # symlinked folders are not followed
      subdirs.sort()
      for name in sorted(files):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          continue
        relative = os.path.relpath(os.path.join(directory, name), self.root)
        path = self._inside(relative)
        if path is None:
          self._skip(relative, None, "unsafe_path")
          continue
        caption_file = Path(directory, os.path.splitext(name)[0] + ".txt")
        if not caption_file.is_file():
          self._skip(relative, None, "missing_caption", f"no {caption_file.name}")
          continue
        try:
          caption = caption_file.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as e:
          self._skip(caption_file, None, "bad_encoding", str(e))
          continue
        if not caption:
          self._skip(caption_file, None, "missing_caption", "empty")
          continue
        entries.append((path, caption, None))
    return entries

  def _decodes(self, path: Path, caption: str, line: int | None) -> bool:
    del caption
    try:
      _load_image(path)
    except Exception as e:  # PIL raises several types for bad files  # pylint: disable=broad-except
      self._skip(path.relative_to(self.root), line, "corrupt_image", f"{type(e).__name__}: {e}")
      return False
    return True

  # -- random access ----------------------------------------------------------

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    index = int(index)
    image = _load_image(Path(self._paths[index]))
    return {
        "image": transforms.resize_center_crop(image, self.image_size, self.resample),
        "caption": self._captions[index],
    }

  def __repr__(self) -> str:
    return (f"ImageFolderSource(root={str(self.root)!r}, len={len(self)}, "
            f"image_size={self.image_size}, skipped={len(self.skipped)})")
