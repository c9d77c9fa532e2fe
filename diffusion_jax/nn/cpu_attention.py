"""A fused float32 attention kernel for the CPU, built on first use and called through XLA's FFI.

XLA's CPU backend has no fused attention: `attention.tiled_attention` runs each step of a score tile
as its own library call or loop, with the tile going out to memory between them. The kernel in
`kernels/attention_cpu.cc` keeps one block of 32 queries in the cache from the q k^T product to the
output (over chunks of 256 keys, with an online softmax) and, backward, to dq, dk and dv, as torch's
CPU flash attention does.

It is compiled once per machine with the system's C++ compiler (`$CXX`, else `c++`) against
jaxlib's FFI headers, for this CPU's instruction set (`ARCH`), and kept under `$DIFFUSION_JAX_CACHE`
(default `~/.cache/diffusion_jax`)/kernels; a build takes about 5 s. Where it cannot be built (no
compiler, a jaxlib without these headers), `available()` says why once and attention runs as XLA
tiles instead; set `ENABLED = False` (or DIFFUSION_JAX_CPU_KERNEL=0) to choose the tiles.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings

import jax
import jaxlib
import numpy as np

ENABLED = os.environ.get("DIFFUSION_JAX_CPU_KERNEL", "1") != "0"
_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "attention_cpu.cc")
# The target instruction set: this machine's (AVX-512, AVX2 and SSE or NEON builds each use their own
# vector width), or e.g. "-march=x86-64-v3" for a library that also runs on older CPUs.
ARCH = os.environ.get("DIFFUSION_JAX_CPU_KERNEL_ARCH", "-march=native")
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-w")
_TARGETS = {"forward": "DiffusionJaxAttentionForward", "backward": "DiffusionJaxAttentionBackward"}


_DEFAULT_DIR = object()
_kept_in = _DEFAULT_DIR  # set by `keep_builds_in`
_LIBRARIES: list = []  # loaded libraries, kept for the process's lifetime


def cache_dir() -> str | None:
  """Where built libraries are kept; None: nowhere (each process builds in a temporary directory)."""
  if _kept_in is not _DEFAULT_DIR:
    return _kept_in
  root = os.environ.get("DIFFUSION_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax"))
  return os.path.join(root, "kernels")


def keep_builds_in(directory: str | None) -> None:
  """Keeps built libraries in `directory` from now on; None keeps none (for runs that write no caches)."""
  global _kept_in
  _kept_in = directory


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and features."""
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:4096]
  except OSError:
    return platform.processor()


def _build(compiler: str, directory: str) -> str:
  """Compiles the kernel into `directory` (once per source, compiler, jaxlib and CPU); the library's path."""
  with open(_SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in (
      source, version, " ".join((ARCH, *_FLAGS)), jaxlib.__version__, platform.machine(), _cpu_signature()))).hexdigest()[:16]
  path = os.path.join(directory, f"attention_cpu-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  # Built under a temporary name and renamed: processes building at once never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  try:
    subprocess.run([compiler, *shlex.split(ARCH), *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp],
                   capture_output=True, text=True, check=True)
    os.replace(tmp, path)
  except subprocess.CalledProcessError as error:
    raise RuntimeError(f"{compiler} failed: {error.stderr[-2000:]}") from error
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None if that worked, else the reason."""
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    return "no C++ compiler ($CXX or c++) found"
  try:
    if cache_dir() is None:
      with tempfile.TemporaryDirectory() as directory:  # a loaded library outlives its file
        library = ctypes.cdll.LoadLibrary(_build(compiler, directory))
    else:
      library = ctypes.cdll.LoadLibrary(_build(compiler, cache_dir()))
    for name in _TARGETS.values():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  except Exception as error:  # a compiler, jaxlib or platform the kernel does not build with
    return f"{type(error).__name__}: {error}"
  _LIBRARIES.append(library)
  return None


def available() -> bool:
  """Whether the kernel is enabled and built (warns once with the reason where it cannot be)."""
  if not ENABLED:
    return False
  reason = _load()
  if reason is not None:
    _warn_once(f"the CPU attention kernel is not available ({reason}); attention runs as XLA tiles")
  return reason is None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  warnings.warn(message, stacklevel=3)


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
