"""Generation sharded over 8 CPU devices gives the images of one device."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.sd_fixtures import build_sd_directory


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  return build_sd_directory(str(tmp_path_factory.mktemp("sd1")), style="sd1")


SHARD_SCRIPT = r"""
import os, sys, numpy as np, diffusion_jax as dj, jax
pipe = dj.Pipeline.from_pretrained(sys.argv[1])
kwargs = dict(num_images=3, num_inference_steps=4, sampler=sys.argv[3], seed=7, output_type="np")
images = pipe(["a red cat", "a blue dog", "a green circle"], **kwargs)
np.save(sys.argv[2], images)
# A step at a time (progress bar), with compiled programs kept on disk: the step's output keeps its
# input's sharding, so one compiled step serves every step (begin, advance, finish: 3 programs).
pipe.program_cache_dir = sys.argv[4]
stepped = pipe(["a red cat", "a blue dog", "a green circle"], progress=True, **kwargs)
np.testing.assert_allclose(stepped, images, atol=2e-5)
print(len(os.listdir(sys.argv[4])), len(jax.devices()))
"""


@pytest.mark.slow
def test_eight_devices_give_the_images_of_one(sd_dir, tmp_path):
  outs = []
  for count in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    out = tmp_path / f"{count}.npy"
    res = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, sd_dir, str(out), "euler_a",
                          str(tmp_path / f"programs{count}")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"3 {count}"
    outs.append(np.load(out))
  assert outs[0].shape == (9, 16, 16, 3)  # 9 images: padded to 16 over 8 devices, then cut back
  # The same noise reaches every image; only float rounding differs between the batch layouts.
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
  assert np.abs(np.round(outs[0] * 255) - np.round(outs[1] * 255)).max() <= 1
