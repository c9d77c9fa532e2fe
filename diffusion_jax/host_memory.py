"""Transparent huge pages for XLA's host buffers on Linux (the CPU backend's speed).

On the CPU, XLA allocates each execution's temporary buffer with `posix_memalign`; at these sizes
glibc maps fresh pages from the kernel every call and unmaps them afterwards: hundreds of thousands
of 4 KiB page faults per train step of a mid-sized UNet. glibc's `glibc.malloc.hugetlb=1` tunable
marks those mappings for transparent huge pages: 512x fewer faults (2 MiB pages), and a faster step
(benchmarks/unet.py). glibc reads tunables only
when a process starts, so this is opt-in, for CPU runs: start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` yourself, or pass `--huge-pages` to train.py or sample.py,
which then re-execute themselves once with the tunable set (`reexec_with_huge_pages`). Nothing here
runs on import.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
FLAG = "--huge-pages"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_has_hugetlb_tunable() -> bool:
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return False
  try:
    major, minor = (int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)  # the hugetlb tunable arrived in glibc 2.35


def _kernel_allows_thp(path: str = _THP_SETTING) -> bool:
  try:
    with open(path) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def tunables_env(environ: dict[str, str]) -> dict[str, str] | None:
  """`environ` with the huge-page tunable added to GLIBC_TUNABLES, or None if it is already there."""
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return None
  current = environ.get("GLIBC_TUNABLES")
  return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"}


def reexec_with_huge_pages() -> None:
  """Re-executes this process (same pid, arguments and descriptors) with the tunable, once; else returns.

  For command-line entry points whose user asked for it (`FLAG`), first thing, before work worth
  repeating is done; a no-op where glibc or the kernel cannot give huge pages.
  """
  if not sys.platform.startswith("linux") or not _glibc_has_hugetlb_tunable() or not _kernel_allows_thp():
    return
  env = tunables_env(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # The interpreter's own path as argv[0]: a bare "python" would be looked up on PATH again.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
