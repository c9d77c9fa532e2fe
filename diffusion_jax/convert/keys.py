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


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel" and value.ndim == 2:
    return value.T  # [out, in] -> [in, out]
  return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


# Which Flax leaf receives a PyTorch "weight", by what the Flax module holds.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def torch_to_flax(keys: Iterable[str], get_tensor: Callable[[str], np.ndarray], target: Mapping[str, Any], *,
                  strip_prefix: str = "", dtype: Any = None, convert: Callable[[np.ndarray], Any] | None = None) -> dict:
  """Builds Flax params shaped like `target` (a tree of arrays or ShapeDtypeStructs) from PyTorch tensors.

  `get_tensor(key)` is called once per key, so memory-mapped files are read one tensor at a time, and
  `convert` (e.g. `jnp.asarray`) turns each tensor into its final array before the next is read.
  Raises WeightMismatchError naming every missing, unexpected or mis-shaped key.
  """
  expected = flatten(target)
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched = [], []
  for key in keys:
    if any(re.search(p, key) for p in IGNORED_KEYS):
      continue
    short = key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key
    path = torch_key_to_path(short)
    if path[-1] == "weight":
      candidates = [path[:-1] + (leaf,) for leaf in _WEIGHT_LEAVES if path[:-1] + (leaf,) in expected]
      path = candidates[0] if candidates else path[:-1] + ("kernel",)
    if path not in expected:
      unexpected.append(key)
      continue
    value = _to_flax_layout(path[-1], np.asarray(get_tensor(key)))
    want = tuple(expected[path].shape)
    if value.shape != want:
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {want} at {'/'.join(path)}")
      continue
    value = value.astype(dtype or expected[path].dtype, copy=False)
    out[path] = convert(value) if convert is not None else value
  missing = ["/".join(p) for p in expected if p not in out]
  if unexpected or mismatched or missing:
    lines = []
    if mismatched:
      lines.append("shape mismatch: " + "; ".join(mismatched[:20]))
    if missing:
      lines.append(f"missing from checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
    if unexpected:
      lines.append(f"not in model ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    raise WeightMismatchError("checkpoint does not match the architecture: " + " | ".join(lines))
  return unflatten(out)


def flax_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (numpy arrays, reference layouts and names)."""
  out = {}
  for path, value in flatten(params).items():
    leaf = path[-1]
    name = "weight" if leaf in _WEIGHT_LEAVES else leaf
    key = prefix + path_to_torch_key(path[:-1]) + "." + name if len(path) > 1 else prefix + name
    out[key] = np.ascontiguousarray(_to_torch_layout(leaf, np.asarray(value)))
  return out
