"""train.py on a 2-device CPU mesh with FSDP: parameters and optimizer state sharded, batches split."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fsdp_run_on_two_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(workdir), "--config.data.data_dir", str(tmp_path / "data"),
       "--config.compilation_cache_dir", "", "--config.stages=('autoencoder', 'clip')",
       "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.autoencoder.steps=8",
       "--config.clip.steps=8"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["autoencoder"]["final"]["psnr"] > 5 and "zero_shot_accuracy" in results["clip"]["final"]
  layout = (workdir / "stages" / "clip_shardings.txt").read_text().splitlines()
  fc1 = next(line for line in layout if line.startswith("params/text_model/encoder/layers_0/mlp/fc1/kernel:"))
  assert "'fsdp'" in fc1 and "shard=(16, 128)" in fc1, fc1  # [32, 128] split along "embed" over 2 devices
  mu = next(line for line in layout if "mu/text_model/encoder/layers_0/mlp/fc1/kernel:" in line)
  assert "shard=(16, 128)" in mu, mu  # Adam's moments follow their parameters
  from diffusion_jax.checkpoint import Checkpointer
  with Checkpointer.for_workdir(str(workdir)) as ckpt:
    items = ckpt.restore(abstract_items=dict.fromkeys(["vae", "clip", "clip_opt_state", "clip_counters"])).items
  assert items["clip_counters"] is not None

  # An odd batch does not split over the two devices: a clear error before anything compiles.
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "smoke.py"),
       "--workdir", str(tmp_path / "bad"), "--config.data.data_dir", str(tmp_path / "data"),
       "--config.autoencoder.batch_size=7"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "train.py: error: config.autoencoder.batch_size 7 (micro-batches of 7) is not divisible by the 2 devices "
      "it is split over")
