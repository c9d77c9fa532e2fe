"""sample.py: PNGs with their parameters, the compilation cache, and one clear line for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.sd_fixtures import build_sd_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp("sd1")), style="sd1")


def run_sample(*args, cache_dir):
  return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args, "--cache-dir", str(cache_dir)],
                        capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_writes_pngs_with_parameters_and_fills_the_compilation_cache(sd_dir, tmp_path):
  cache = tmp_path / "xla"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red cat\n\na blue dog\n", encoding="utf-8")
  res = run_sample("--prompts-file", str(prompts), "--model", sd_dir, "--steps", "3", "--n", "2",
                   "--sampler", "euler", "--seed", "5", "--out", str(tmp_path / "out"), cache_dir=cache)
  assert res.returncode == 0, res.stderr[-3000:]
  paths = res.stdout.split()
  assert len(paths) == 4 and all(os.path.exists(p) for p in paths)
  with Image.open(paths[2]) as im:
    assert im.size == (16, 16) and im.mode == "RGB"
    meta = json.loads(im.text["parameters"])
  assert meta["prompt"] == "a blue dog" and meta["seed"] == 6 and meta["sampler"] == "euler"
  assert meta["steps"] == 3 and meta["dtype"] == "float32"
  assert "sampling" in res.stderr  # the per-step progress bar
  # The sampling step is in the cache (a program holding a host callback would not be), so the next
  # process does not compile the loop again.
  cached = os.listdir(cache)
  assert any(name.startswith("jit_advance-") for name in cached), cached
  programs = sorted(os.listdir(cache / "programs"))  # begin, one step, finish
  assert len(programs) == 3, programs

  # The same command again gives the same pixels.
  again = run_sample("--prompts-file", str(prompts), "--model", sd_dir, "--steps", "3", "--n", "2",
                     "--sampler", "euler", "--seed", "5", "--out", str(tmp_path / "out2"), cache_dir=cache)
  assert again.returncode == 0, again.stderr[-3000:]
  for a, b in zip(paths, again.stdout.split()):
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
  # The second process found its programs under the same keys: it stored none.
  assert sorted(os.listdir(cache / "programs")) == programs


@pytest.mark.parametrize("args, message", [
    (["a cat", "--sampler", "plms"], "unknown sampler 'plms'; choose one of ddpm, ddim, euler"),
    (["a cat", "--size", "15"], "multiples of 2"),
    (["a cat", "--model", "/no/such/model"], "model path '/no/such/model' not found"),
    (["a cat", "--init-image", "{tmp}/broken.png"], "cannot read init image"),
    (["a cat", "--init-image", "{tmp}/ok.png", "--mask", "{tmp}/small_mask.png"], "mask is 8x8 but the image is 16x16"),
    (["a cat", "--mask", "{tmp}/small_mask.png"], "--mask needs --init-image"),
    ([], "give either a PROMPT or --prompts-file"),
])
def test_bad_input_is_one_clear_line(sd_dir, tmp_path, args, message):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
  args = [a.format(tmp=tmp_path) for a in args]
  if "--model" not in args:
    args += ["--model", sd_dir]
  res = run_sample(*args, "--steps", "2", "--out", str(tmp_path / "out"), cache_dir=tmp_path / "xla")
  assert res.returncode == 2
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("sample.py: error:") and message in last, res.stderr[-2000:]
  assert "Traceback" not in res.stderr


def test_an_empty_cache_dir_turns_the_caches_off(sd_dir, tmp_path):
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  cwd.mkdir()
  res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "a cat", "--model", sd_dir, "--steps", "2",
                        "--out", str(tmp_path / "out"), "--cache-dir", ""], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home)), cwd=cwd)
  assert res.returncode == 0, res.stderr[-3000:]
  assert len(res.stdout.split()) == 1
  assert not os.path.exists(home / ".cache") and os.listdir(cwd) == []  # no cache written anywhere
