"""A fused float32 attention kernel for the CPU, built on first use and called through XLA's FFI.

XLA's CPU backend has no fused attention: `attention.tiled_attention` runs each step of a score tile
as its own library call or loop, with the tile going out to memory between them. The kernel in
`kernels/attention_cpu.cc` keeps one block of 32 queries in the cache from the q k^T product to the
output (over chunks of 256 keys, with an online softmax) and, backward, to dq, dk and dv, as torch's
CPU flash attention does.

It is compiled once per machine with the system's C++ compiler against jaxlib's FFI headers, as
`BuildSettings` say (by default for this CPU's instruction set, kept in `~/.cache/diffusion_jax/kernels`);
a build takes about 5 s. Models run it where their config says `attention="cpu_kernel"`
(`diffusion_jax.hardware` chooses that on one CPU device); where it cannot be built (no compiler, a
jaxlib without these headers), `available()` says why once and attention runs as XLA tiles instead.

A process loads the kernel once: the first `available(settings)` call that builds it decides where it
is kept, and later calls (the models' own, with the default settings) find it loaded.

    cpu_attention.available(cpu_attention.BuildSettings(cache_dir=None))  # build afresh, keep nothing
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib
import numpy as np

from diffusion_jax.util import warn_once

_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "attention_cpu.cc")
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-w")
_TARGETS = {"forward": "DiffusionJaxAttentionForward", "backward": "DiffusionJaxAttentionBackward"}
FFI_TARGETS = tuple(_TARGETS.values())  # the custom-call names in programs that run the kernel
# The FFI targets the kernel registers: programs that call them name them (e.g. for `jax.export`).
FFI_TARGETS = tuple(_TARGETS.values())
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "kernels")


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """How the kernel is built, where the process has not loaded it yet."""
  # Where built libraries are kept and found again; None: nowhere (built in a temporary directory).
  cache_dir: str | None = DEFAULT_CACHE_DIR
  # The target instruction set: this machine's (AVX-512, AVX2 and SSE or NEON builds each use their own
  # vector width), or e.g. "-march=x86-64-v3" for a library that also runs on older CPUs.
  arch: str = "-march=native"
  # The C++ compiler; None: `c++` (else `g++`) on the PATH.
  compiler: str | None = None


_LIBRARIES: list = []  # the loaded library, kept for the process's lifetime (its FFI targets are registered)


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and features."""
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:4096]
  except OSError:
    return platform.processor()


def _build(compiler: str, directory: str, arch: str) -> str:
  """Compiles the kernel into `directory` (once per source, compiler, flags, jaxlib and CPU); the library's path."""
  with open(_SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in (
      source, version, " ".join((arch, *_FLAGS)), jaxlib.__version__, platform.machine(), _cpu_signature()))).hexdigest()[:16]
  path = os.path.join(directory, f"attention_cpu-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  # Built under a temporary name and renamed: processes building at once never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  try:
    subprocess.run([compiler, *shlex.split(arch), *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp],
                   capture_output=True, text=True, check=True)
    os.replace(tmp, path)
  except subprocess.CalledProcessError as error:
    raise RuntimeError(f"{compiler} failed: {error.stderr[-2000:]}") from error
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.lru_cache(maxsize=None)
def _load(settings: BuildSettings) -> str | None:
  """Builds, loads and registers the kernel once per process; None if that worked, else the reason."""
  if _LIBRARIES:  # its FFI targets are registered already, whichever settings built it
    return None
  compiler = settings.compiler or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    return "no C++ compiler (c++ or g++) found"
  try:
    if settings.cache_dir is None:
      with tempfile.TemporaryDirectory() as directory:  # a loaded library outlives its file
        library = ctypes.cdll.LoadLibrary(_build(compiler, directory, settings.arch))
    else:
      library = ctypes.cdll.LoadLibrary(_build(compiler, settings.cache_dir, settings.arch))
    for name in _TARGETS.values():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  except Exception as error:  # a compiler, jaxlib or platform the kernel does not build with
    return f"{type(error).__name__}: {error}"
  _LIBRARIES.append(library)
  return None


def available(settings: BuildSettings | None = None) -> bool:
  """Whether the kernel is loaded in this process, building it with `settings` (default `BuildSettings()`)
  if it is not; warns once with the reason where it cannot be built."""
  reason = _load(settings or BuildSettings())
  if reason is not None:
    warn_once(f"the CPU attention kernel is not available ({reason}); attention runs as XLA tiles")
  return reason is None


def attention(q, k, v):
  """softmax(q k^T / sqrt(Dh)) v for float32 [B, T, N, Dh] / [B, S, N, Dh] through the kernel."""
  return _attention(q, k, v, q.shape[-1] ** -0.5)


def _forward_call(q, k, v, scale):
  *batch, t, n, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*batch, n, t), q.dtype))
  return jax.ffi.ffi_call(_TARGETS["forward"], out_types, vmap_method="broadcast_all")(
      q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):  # [..., T, N, D], [..., S, N, D], [..., S, N, D] -> [..., T, N, D]
  return _forward_call(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
  out, lse = _forward_call(q, k, v, scale)  # lse [..., N, T]
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, residuals, d_out):
  q, k, v, out, lse = residuals
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  return jax.ffi.ffi_call(_TARGETS["backward"], out_types, vmap_method="broadcast_all")(
      q, k, v, out, lse, d_out, scale=np.float32(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)
