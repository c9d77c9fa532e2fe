"""Importing weights needs little more resident memory than the parameters themselves."""
import os
import subprocess
import sys

MEASURE = r"""
import sys
import diffusion_jax as dj
def rss_peak():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
before = rss()
config, module, params = dj.load_component(sys.argv[1], "vae")
jax.block_until_ready(params)
print(before, rss_peak())
"""


def test_vae_import_peak_memory_is_near_one_copy(tmp_path):
  import diffusers
  import torch
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
  vae.save_pretrained(tmp_path / "vae")  # the SD 1.x/2.x VAE: 83.7M parameters, 335 MB
  del vae
  weights = os.path.getsize(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
  res = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  before, peak = map(int, res.stdout.split()[-2:])
  growth = peak - before
  print(f"weights {weights / 2**20:.0f} MiB, peak resident growth {growth / 2**20:.0f} MiB "
        f"({growth / weights:.2f}x)")
  assert growth <= 1.5 * weights, (growth, weights)
