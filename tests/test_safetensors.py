"""The safetensors reader: equal to the reference library, memory-mapped, and refuses lying headers."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings, strategies as st

from diffusion_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file


def _write_raw(path, header: dict, data: bytes, header_len=None):
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if header_len is None else header_len))
    f.write(blob)
    f.write(data)


def test_reads_what_the_reference_writes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
             "b": rng.standard_normal((5,)).astype(np.float16),
             "c": np.arange(6, dtype=np.int64).reshape(2, 3), "empty": np.zeros((0, 3), np.float32)}
  safetensors.numpy.save_file(tensors, tmp_path / "x.safetensors")
  f = SafetensorsFile(tmp_path / "x.safetensors")
  assert sorted(f.keys()) == sorted(tensors)
  for k, v in tensors.items():
    got = f.get_tensor(k)
    assert got.dtype == v.dtype and got.shape == v.shape
    np.testing.assert_array_equal(got, v)
  assert not f.get_tensor("a").flags.writeable  # a view of the read-only map, not a copy


def test_bfloat16_round_trip_through_torch(tmp_path):
  t = torch.randn(4, 3).bfloat16()
  import safetensors.torch
  safetensors.torch.save_file({"w": t}, tmp_path / "bf.safetensors")
  got = SafetensorsFile(tmp_path / "bf.safetensors").get_tensor("w")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
  save_file({"w": got}, tmp_path / "ours.safetensors")
  back = safetensors.torch.load_file(tmp_path / "ours.safetensors")["w"]
  assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_our_writer_is_read_by_the_reference(tmp_path):
  x = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)
  save_file({"x": x}, tmp_path / "w.safetensors", metadata={"format": "pt"})
  np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "w.safetensors")["x"], x)


@pytest.mark.parametrize("entry, why", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "spans"),           # size disagrees with shape
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 40]}, "outside"),   # past the end of the file
    ({"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 16]}, "spans"),  # huge declared shape
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "negative"),
    ({"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}, "malformed"),
    ({"dtype": "F32", "shape": [4]}, "malformed"),
])
def test_lying_headers_are_refused(tmp_path, entry, why):
  path = tmp_path / "bad.safetensors"
  _write_raw(path, {"t": entry}, b"\0" * 16)
  with pytest.raises(SafetensorsError, match=why):
    SafetensorsFile(path)


def test_overlapping_tensors_and_bad_header_lengths_are_refused(tmp_path):
  path = tmp_path / "overlap.safetensors"
  _write_raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
  with pytest.raises(SafetensorsError, match="overlap"):
    SafetensorsFile(path)
  _write_raw(path, {}, b"", header_len=1 << 60)
  with pytest.raises(SafetensorsError, match="header length"):
    SafetensorsFile(path)
  path.write_bytes(b"\x01\x00")
  with pytest.raises(SafetensorsError, match="too short"):
    SafetensorsFile(path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_are_read_or_refused_cleanly(tmp_path_factory, blob):
  path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
  path.write_bytes(blob)
  try:
    f = SafetensorsFile(path)
  except SafetensorsError:
    return
  for k in f.keys():  # whatever was accepted must be readable within the file
    f.get_tensor(k)
