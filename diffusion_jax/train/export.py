"""Atomic export of the sampling model to `<workdir>/model` in diffusers format.

The pipeline is written into a temporary sibling directory, then swapped in with renames, so a
reader (or a run killed mid-export) never sees a half-written model: `model/` is either the
previous export or the new one.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

import jax

from diffusion_jax.pipeline import Pipeline

_TMP_PREFIX = ".export-tmp-"
_OLD_PREFIX = ".export-old-"


def recover(directory: str) -> None:
  """Cleans up after an export that was killed: drops partial copies, restores a moved-away model."""
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  for tmp in glob.glob(os.path.join(parent, f"{_TMP_PREFIX}{name}-*")):
    shutil.rmtree(tmp, ignore_errors=True)
  olds = sorted(glob.glob(os.path.join(parent, f"{_OLD_PREFIX}{name}-*")))
  if olds and not os.path.exists(directory):
    os.rename(olds.pop(), directory)  # killed between the two renames
  for old in olds:
    shutil.rmtree(old, ignore_errors=True)


def save_pipeline(pipe: Pipeline, directory: str) -> None:
  """Writes `pipe` (host arrays) as a diffusers-format directory, replacing `directory` atomically.

  Only process 0 writes.
  """
  if jax.process_index() != 0:
    return
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  recover(directory)
  tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=parent)
  try:
    pipe.save_pretrained(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(directory):
    old = tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{name}-", dir=parent)
    os.rmdir(old)
    os.rename(directory, old)
  os.rename(tmp, directory)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
