"""The one table between PyTorch state-dict keys (diffusers / transformers) and Flax parameter paths.

Flax submodules are named after the reference modules, so most keys map by one generic rule:
`down_blocks.0.resnets.1.conv1.weight` -> ("down_blocks_0", "resnets_1", "conv1", "kernel"). The table
below holds the exceptions: legacy names, prefixes and buffers. Tensor layouts are decided by the
Flax leaf that receives the tensor (kernel of a conv or a dense layer, norm scale, embedding table).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# (pattern, replacement) applied in order to every PyTorch key before the generic rule.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    # Older diffusers VAE checkpoints name the mid-block attention projections differently.
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
)
# PyTorch keys that hold buffers, not parameters.
IGNORED_KEYS: tuple[str, ...] = (r"(^|\.)position_ids$",)
# Flax names whose trailing "_N" is part of the reference name, not a list index.
KEEP_UNDERSCORE: tuple[str, ...] = ("linear_1", "linear_2")


class WeightMismatchError(ValueError):
  """A checkpoint does not fit the architecture: names the keys and shapes involved."""


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """`a.0.b.weight` -> ("a_0", "b", "weight"): list indices are folded into the preceding name."""
  for pattern, repl in KEY_RENAMES:
    key = re.sub(pattern, repl, key)
  parts: list[str] = []
  for part in key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """Inverse of `torch_key_to_path` for module names; the leaf is renamed by the caller."""
  out = []
  for name in path:
    m = re.fullmatch(r"(.+?)_(\d+)", name)
    if m and name not in KEEP_UNDERSCORE:
      out.extend(m.groups())
    else:
      out.append(name)
  return ".".join(out)


def flax_layout_axes(leaf: str, ndim: int) -> tuple[int, ...] | None:
  """The transpose taking a PyTorch tensor to the Flax leaf's layout, None when it is the same."""
  if leaf == "kernel" and ndim == 4:
    return (2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel" and ndim == 2:
    return (1, 0)  # [out, in] -> [in, out]
  return None


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  axes = flax_layout_axes(leaf, value.ndim)
  return value if axes is None else np.transpose(value, axes)


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


# Which Flax leaf receives a PyTorch "weight", by what the Flax module holds.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_IGNORED = tuple(re.compile(p) for p in IGNORED_KEYS)

def flax_path(key: str, strip_prefix: str = "") -> tuple[str, ...] | None:
  """The Flax path of a PyTorch key, its leaf still "weight" where the module decides; None for buffers."""
  if any(p.search(key) for p in _IGNORED):
    return None
  short = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
  return torch_key_to_path(short)


def resolve_weight(path: tuple[str, ...], expected: Mapping[tuple[str, ...], Any]) -> tuple[str, ...]:
  """A "weight" path -> the leaf the model holds there (kernel, scale or embedding)."""
  if path[-1] != "weight":
    return path
  for leaf in _WEIGHT_LEAVES:
    if path[:-1] + (leaf,) in expected:
      return path[:-1] + (leaf,)
  return path[:-1] + ("kernel",)


def guess_weight(path: tuple[str, ...], ndim: int) -> tuple[str, ...]:
  """`resolve_weight` without the model, from the tensor alone: norms hold 1-D scales, embedding
  tables sit in modules named `*_embedding`, everything else is a dense or conv kernel. Callers check
  the guess against the model and redo the few tensors it got wrong."""
  if path[-1] != "weight":
    return path
  if ndim == 1:
    return path[:-1] + ("scale",)
  if ndim == 2 and len(path) > 1 and path[-2].endswith("embedding"):
    return path[:-1] + ("embedding",)
  return path[:-1] + ("kernel",)


def flax_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  axes = flax_layout_axes(leaf, len(shape))
  return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def mismatch_error(expected: Mapping[tuple[str, ...], Any], found: Mapping[tuple[str, ...], str],
                   unexpected: list[str], mismatched: list[str]) -> WeightMismatchError | None:
  """The error naming every missing, unexpected or mis-shaped key, or None when all match.

  `found` maps each Flax path the checkpoint filled to its PyTorch key."""
  missing = ["/".join(p) for p in expected if p not in found]
  if not (unexpected or mismatched or missing):
    return None
  lines = []
  if mismatched:
    lines.append("shape mismatch: " + "; ".join(mismatched[:20]))
  if missing:
    lines.append(f"missing from checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
  if unexpected:
    lines.append(f"not in model ({len(unexpected)}): " + ", ".join(unexpected[:20]))
  return WeightMismatchError("checkpoint does not match the architecture: " + " | ".join(lines))


def mismatch_line(key: str, got: tuple[int, ...], want: tuple[int, ...], path: tuple[str, ...]) -> str:
  return f"{key}: checkpoint {tuple(got)} vs model {tuple(want)} at {'/'.join(path)}"


def torch_to_flax(keys: Iterable[str], get_tensor: Callable[[str], np.ndarray], target: Mapping[str, Any], *,
                  strip_prefix: str = "", dtype: Any = None, convert: Callable[[np.ndarray], Any] | None = None) -> dict:
  """Builds Flax params shaped like `target` (a tree of arrays or ShapeDtypeStructs) from PyTorch tensors.

  `get_tensor(key)` is called once per key, so memory-mapped files are read one tensor at a time, and
  `convert` (e.g. `jnp.asarray`) turns each tensor into its final array before the next is read.
  Raises WeightMismatchError naming every missing, unexpected or mis-shaped key.
  """
  expected = traverse_util.flatten_dict(target)
  out: dict[tuple[str, ...], Any] = {}
  found: dict[tuple[str, ...], str] = {}
  unexpected, mismatched = [], []
  for key in keys:
    path = flax_path(key, strip_prefix)
    if path is None:
      continue
    path = resolve_weight(path, expected)
    if path not in expected:
      unexpected.append(key)
      continue
    value = _to_flax_layout(path[-1], np.asarray(get_tensor(key)))
    want = tuple(expected[path].shape)
    found[path] = key
    if value.shape != want:
      mismatched.append(mismatch_line(key, value.shape, want, path))
      continue
    value = value.astype(dtype or expected[path].dtype, copy=False)
    out[path] = convert(value) if convert is not None else value
  error = mismatch_error(expected, found, unexpected, mismatched)
  if error is not None:
    raise error
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (numpy arrays, reference layouts and names)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaf = path[-1]
    name = "weight" if leaf in _WEIGHT_LEAVES else leaf
    key = prefix + path_to_torch_key(path[:-1]) + "." + name if len(path) > 1 else prefix + name
    out[key] = np.ascontiguousarray(_to_torch_layout(leaf, np.asarray(value)))
  return out
