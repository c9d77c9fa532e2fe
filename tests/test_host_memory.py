"""Huge pages for XLA's host buffers: opt-in for the command-line entry points, never on import."""
import os
import subprocess
import sys

import pytest

from diffusion_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What train.py and sample.py do first: re-execute with the tunable only when asked to.
PROBE = ("import os, sys; from diffusion_jax import host_memory; print('start', flush=True); "
         "host_memory.FLAG in sys.argv[1:] and host_memory.reexec_with_huge_pages(); "
         "print('tunables', os.environ.get('GLIBC_TUNABLES'))")
HUGE_PAGES_WORK = (sys.platform.startswith("linux") and host_memory._glibc_has_hugetlb_tunable()
                   and host_memory._kernel_allows_thp())


def test_tunables_env_adds_and_merges():
  assert host_memory.tunables_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  merged = host_memory.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert merged == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
  assert host_memory.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stays


def test_kernel_setting_parsing(tmp_path):
  for text, allowed in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                        ("always madvise [never]\n", False)):
    (tmp_path / "enabled").write_text(text)
    assert host_memory._kernel_allows_thp(str(tmp_path / "enabled")) is allowed
  assert host_memory._kernel_allows_thp(str(tmp_path / "missing")) is False


def _clean_env():
  return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def test_importing_the_package_never_reexecutes():
  code = "print('start', flush=True); import diffusion_jax.pipeline, diffusion_jax.train.loop; print('done')"
  out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout
  assert out.splitlines() == ["start", "done"]


def test_without_the_flag_the_process_is_not_replaced():
  out = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env(), capture_output=True, text=True,
                       check=True).stdout
  assert out.splitlines() == ["start", "tunables None"]


@pytest.mark.skipif(not HUGE_PAGES_WORK, reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_with_the_flag_it_reexecutes_once_with_the_tunable():
  out = subprocess.run([sys.executable, "-c", PROBE, host_memory.FLAG], env=_clean_env(), capture_output=True,
                       text=True, check=True).stdout
  # The first run prints "start" and is replaced; the re-executed one prints "start" again and continues.
  assert out.splitlines() == ["start", "start", "tunables glibc.malloc.hugetlb=1"]


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_the_clis_document_the_flag(script):
  out = subprocess.run([sys.executable, script, "--help"],
                       capture_output=True, text=True, cwd=ROOT, env=_clean_env())
  assert "huge-pages" in out.stdout + out.stderr
