"""Traced programs kept on disk as serialized StableHLO (`jax.export`), found again without tracing.

XLA's persistent compilation cache (`jax_compilation_cache_dir`) saves XLA's work, but it finds an
entry by the lowered program, so every new process first traces the Python code and lowers it: for
the default model's sampling loop that is most of what a second process spends before generating.
`ProgramCache` stores the program's StableHLO, as `jax.export` serializes it (a flatbuffer: data, no
code and no pickle), under a key made without tracing, from everything the program depends on:

- the source of this package and the versions of Python, JAX, jaxlib, Flax and NumPy;
- JAX's configuration and XLA's and libtpu's environment variables;
- the devices and the process count;
- the caller's description of the program: its static settings and the modules it runs, which must
  be this package's (`describe` returns None for anything else, and such programs are not cached);
- the arguments' tree structure, shapes, dtypes and shardings.

A loaded program is compiled as usual, so XLA's persistent cache (set it up as well) supplies the
executable: the first process compiles the same deserialized program, and stores it there.

    cache = ProgramCache("~/.cache/diffusion_jax/programs")
    run = cache.wrap(jax.jit(fn), ("sampling loop", unet_module, steps))
    images = run(*args)  # loads the program, or traces it and stores it
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import tempfile
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jaxlib
import numpy as np
from jax import export

from diffusion_jax.nn import cpu_attention
from diffusion_jax.util import warn_once

LOAD_EVENT = "/diffusion_jax/program_cache/load_sec"  # jax.monitoring durations, for benchmarks
SAVE_EVENT = "/diffusion_jax/program_cache/save_sec"
SUFFIX = ".jaxexport"
_ENV_PREFIXES = ("XLA_", "LIBTPU_", "TPU_", "JAX_")
_PACKAGE = __name__.split(".")[0]
# The package's own custom calls (the CPU attention kernel): `jax.export` accepts only targets it
# knows to be stable unless told; ours are versioned with the package's source, which the key covers.
_OWN_CUSTOM_CALLS = tuple(export.DisabledSafetyCheck.custom_call(name) for name in cpu_attention.FFI_TARGETS)


class NotDescribable(TypeError):
  """A value whose identity cannot be written into a cache key (code from outside this package)."""


def describe(value: Any) -> str:
  """A deterministic text for `value`; raises NotDescribable for what a key cannot capture.

  Plain data, NumPy arrays (by content), dataclasses and Flax modules of this package (by their fields)
  are describable; functions, and classes from elsewhere, are not.
  """
  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    return repr(value)
  if isinstance(value, (np.ndarray, np.generic)):
    value = np.asarray(value)
    return f"ndarray({value.dtype},{value.shape},{hashlib.sha256(value.tobytes()).hexdigest()})"
  if isinstance(value, np.dtype):
    return f"dtype({value.name})"
  if isinstance(value, (tuple, list)):
    return type(value).__name__ + "(" + ",".join(describe(v) for v in value) + ")"
  if isinstance(value, dict):
    items = sorted((describe(k), describe(v)) for k, v in value.items())
    return "dict(" + ",".join(f"{k}:{v}" for k, v in items) + ")"
  cls = type(value)
  if dataclasses.is_dataclass(value) and cls.__module__.split(".")[0] == _PACKAGE:
    skip = ("parent", "name") if isinstance(value, nn.Module) else ()
    fields = ",".join(f"{f.name}={describe(getattr(value, f.name))}" for f in dataclasses.fields(value)
                      if f.name not in skip)
    return f"{cls.__module__}.{cls.__qualname__}({fields})"
  if isinstance(value, type) and (issubclass(value, np.generic) or isinstance(getattr(value, "dtype", None), np.dtype)):
    return f"dtype({np.dtype(value).name})"  # scalar types used as dtypes: np.float32, jnp.bfloat16
  raise NotDescribable(f"{cls.__module__}.{cls.__qualname__} cannot be described for a program cache key")


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
  """sha256 of every Python and C++ file of this package (paths and contents)."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for directory, subdirectories, files in os.walk(root):
    subdirectories.sort()
    for name in sorted(files):
      if name.endswith((".py", ".cc")):
        path = os.path.join(directory, name)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def _environment() -> str:
  config = []
  for name, value in sorted(jax.config.values.items()):
    try:
      config.append(f"{name}={describe(value)}")
    except NotDescribable:  # enums and the like; never an address, which would differ in every process
      text = repr(value)
      config.append(f"{name}={text if ' at 0x' not in text else type(value).__name__}")
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
  versions = (sys.version_info[:2], jax.__version__, jaxlib.__version__, flax.__version__, np.__version__)
  return describe((versions, _source_digest(), config, env, repr(devices), jax.process_count()))


def _sharding_text(sharding) -> str:
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh = sharding.mesh
    # Mesh axes of size 1 split nothing: P("data") on one device is P(), as XLA reports outputs.
    spec = [tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a is not None and mesh.shape[a] > 1)
            for e in sharding.spec]
    while spec and not spec[-1]:
      spec.pop()
    return (f"named({mesh.axis_names},{mesh.devices.shape},{[d.id for d in mesh.devices.flat]},"
            f"{spec},{sharding.memory_kind})")
  return f"{sharding!r}{sorted(d.id for d in sharding.device_set)}"


def signature(args: tuple) -> str:
  """The arguments as a compiled program sees them: tree structure, shapes, dtypes, weak types, shardings."""
  leaves, tree = jax.tree.flatten(args)
  parts = [str(tree)]
  for x in leaves:
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    parts.append(f"{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}:{getattr(x, 'weak_type', None)}:"
                 f"{None if sharding is None else _sharding_text(sharding)}")
  return "|".join(parts)


class ProgramCache:
  """Serialized programs in `directory`, keyed as the module docstring says."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.path.expanduser(os.fspath(directory))

  def wrap(self, jitted: Callable, description: Any, compiler_options: dict | None = None) -> Callable:
    """`jitted` (a `jax.jit` function) as a callable that loads or traces-and-stores its programs.

    `description` names the program: its static settings and the modules it runs (see `describe`).
    `compiler_options` are those `jitted` was made with, for compiling the program it exports.
    Without a description that can be described, or in a multi-host run, `jitted` comes back unchanged.
    """
    if jax.process_count() > 1:  # each host would load a program for all hosts' devices: not supported
      return jitted
    try:
      described = describe((description, compiler_options))
    except NotDescribable:
      return jitted
    return _CachedProgram(self, jitted, described, compiler_options)

  def path(self, description: str, args: tuple) -> str:
    material = "\n".join((_environment(), description, signature(args)))
    return os.path.join(self.directory, hashlib.sha256(material.encode()).hexdigest() + SUFFIX)

  def load(self, path: str) -> export.Exported | None:
    """The program at `path`, or None where there is none (or it cannot be read back)."""
    if not os.path.exists(path):
      return None
    start = time.perf_counter()
    try:
      with open(path, "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    except Exception as error:  # a truncated or foreign file: trace again and replace it
      warn_once(f"ignoring the unreadable program {path}: {error}")
      return None
    jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - start)
    return exported

  def save(self, path: str, exported: export.Exported) -> None:
    start = time.perf_counter()
    try:
      payload = exported.serialize()
      os.makedirs(self.directory, exist_ok=True)
      # Written under a temporary name, then renamed: a crash never leaves half a file under the key.
      fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(payload)
      os.replace(tmp, path)
    except Exception as error:  # e.g. a read-only directory
      warn_once(f"not keeping compiled programs in {self.directory}: {error}")
      return
    jax.monitoring.record_event_duration_secs(SAVE_EVENT, time.perf_counter() - start)


def _call_key(args) -> tuple:
  """What a program checks about its arguments, as a cheap hashable: looked up on every call, where
  `signature` builds text for the on-disk key."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "weak_type", None),
                      x.sharding if isinstance(x, jax.Array) else None) for x in leaves)


class _CachedProgram:
  def __init__(self, cache: ProgramCache, jitted: Callable, description: str, compiler_options: dict | None):
    self._cache, self._jitted, self._description = cache, jitted, description
    self._compiler_options = compiler_options
    self._by_call_key: dict[tuple, Callable] = {}
    self._by_path: dict[str, Callable] = {}  # equivalent shardings written differently share a program

  def __call__(self, *args):
    call_key = _call_key(args)
    program = self._by_call_key.get(call_key)
    if program is None:
      path = self._cache.path(self._description, args)
      program = self._by_path.get(path)
      if program is None:
        exported = self._cache.load(path)
        if exported is None:
          exported = export.export(self._jitted, disabled_checks=_OWN_CUSTOM_CALLS)(*args)
          self._cache.save(path, exported)
        # Both processes compile this same program, so XLA's persistent cache serves the second.
        program = jax.jit(_named(exported.call, exported.fun_name), compiler_options=self._compiler_options)
      self._by_path[path] = self._by_call_key[call_key] = program
    return program(*args)


def _named(fn: Callable, name: str) -> Callable:
  """`fn` under `name`, which jit gives the program (and XLA's cache its entry)."""
  def call(*args):
    return fn(*args)
  call.__name__ = call.__qualname__ = name
  return call
