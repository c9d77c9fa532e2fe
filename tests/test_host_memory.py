"""The huge-page re-execution of the command-line entry points."""
import os
import subprocess
import sys

import pytest

from diffusion_jax import host_memory

PROBE = ("import os, sys; from diffusion_jax import host_memory; print('start', flush=True); "
         "host_memory.reexec_with_huge_pages(); print('tunables', os.environ.get('GLIBC_TUNABLES'))")


def test_tunables_env_adds_merges_and_respects_opt_out():
  assert host_memory.tunables_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  merged = host_memory.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert merged == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
  assert host_memory.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stays
  assert host_memory.tunables_env({host_memory.OPT_OUT: "1"}) is None


def test_kernel_setting_parsing(tmp_path):
  for text, allowed in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                        ("always madvise [never]\n", False)):
    (tmp_path / "enabled").write_text(text)
    assert host_memory._kernel_allows_thp(str(tmp_path / "enabled")) is allowed
  assert host_memory._kernel_allows_thp(str(tmp_path / "missing")) is False



@pytest.mark.skipif(not (sys.platform.startswith("linux") and host_memory._glibc_has_hugetlb_tunable()
                         and host_memory._kernel_allows_thp()), reason="needs Linux, glibc >= 2.35 and THP")
def test_reexecutes_once_with_the_tunable():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
  # The first run prints "start" and is replaced; the re-executed one prints "start" again and continues.
  assert out.splitlines() == ["start", "start", "tunables glibc.malloc.hugetlb=1"]
  out = subprocess.run([sys.executable, "-c", PROBE], env={**env, host_memory.OPT_OUT: "1"},
                       capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == ["start", "tunables None"]
