"""Memory-mapped, validating safetensors reader; writing goes through the `safetensors` package.

Why our own reader and not `safetensors.safe_open(..., framework="numpy")`: that one cannot return
bfloat16, and each `get_tensor` copies the tensor into a fresh array while the mapped file stays
resident. An import then writes every weight twice (its copy, then the Flax layout: conv and dense
kernels are transposed) and peaks at about twice the model in resident memory. Here tensors are
read-only views of one memory map that the importer transposes straight into their final buffers,
releasing each tensor's pages of the map as it goes (`release`). The header is validated in full
(known dtypes, shapes that match their byte ranges, ranges inside the file and not overlapping)
before any tensor is touched, and every refusal names the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class SafetensorsError(ValueError):
  """The file is not a valid safetensors file; nothing was read past its header."""


class SafetensorsFile:
  """`keys()`, `shape(key)`, `get_tensor(key)` over a validated, memory-mapped file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SafetensorsError(f"{self.path}: header length {n} exceeds the file ({size} bytes)")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = {k: self._check_entry(k, v, size - 8 - n) for k, v in header.items()}
    spans = sorted((b, e, k) for k, (_, _, b, e) in self._entries.items() if e > b)
    for (_, end, k1), (begin, _, k2) in zip(spans, spans[1:]):
      if begin < end:
        raise SafetensorsError(f"{self.path}: tensors {k1!r} and {k2!r} overlap")
    self._data_start = 8 + n
    self._mmap = None
    if size > self._data_start:
      with open(self.path, "rb") as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

  def _check_entry(self, key, entry, data_size):
    try:
      dtype = DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{self.path}: malformed header entry for {key!r}: {entry!r}") from None
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
      raise SafetensorsError(f"{self.path}: {key!r} has offsets [{begin}, {end}) outside the data "
                             f"({data_size} bytes) or a negative shape {shape}")
    if math.prod(shape) * dtype.itemsize != end - begin:
      raise SafetensorsError(f"{self.path}: {key!r} declares shape {shape} {entry['dtype']} "
                             f"but spans {end - begin} bytes")
    return dtype, shape, begin, end

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key][1]

  def dtype(self, key: str) -> np.dtype:
    return self._entries[key][0]

  def get_tensor(self, key: str, copy: bool = False) -> np.ndarray:
    """A read-only view into the memory map, or with `copy=True` a copy whose pages are then released."""
    dtype, shape, begin, end = self._entries[key]
    if end == begin:
      return np.zeros(shape, dtype)
    view = np.frombuffer(self._mmap, dtype, count=math.prod(shape),
                         offset=self._data_start + begin).reshape(shape)
    if not copy:
      return view
    out = np.array(view)
    del view
    self.release(key)
    return out

  def release(self, key: str) -> None:
    """Drops the tensor's pages of the map from this process (the page cache keeps them).

    Called once a tensor has been copied out, it keeps a whole-model import near one copy of the
    weights in resident memory instead of two (the mapped file plus the arrays made from it).
    """
    _, _, begin, end = self._entries[key]
    if end == begin or self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    # Pages shared with a neighbour that is still to be read are simply mapped again from the cache.
    start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
      self._mmap.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)
    except OSError:  # purely an optimisation
      pass

  def close(self):
    """Drops this handle's reference; the map itself closes once no tensor view uses it."""
    self._entries = {}
    self._mmap = None


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (any dtype in DTYPES, bfloat16 included) as a safetensors file, atomically."""
  import safetensors.numpy
  arrays = {}
  for key, value in tensors.items():
    a = np.asarray(value)
    if a.dtype.newbyteorder("<") not in _NAMES and a.dtype not in _NAMES:
      raise TypeError(f"{key}: dtype {a.dtype} cannot be stored in safetensors")
    arrays[key] = np.ascontiguousarray(a)
  tmp = os.fspath(path) + ".tmp"
  safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
  os.replace(tmp, path)
