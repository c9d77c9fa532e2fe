"""The two forms of `UpsampleConv` on the CPU, per UNet/VAE shape: one 2x2 convolution or four matmuls.

  python benchmarks/upsample.py --out benchmarks/results/upsample.json

`diffusion_jax.nn.layers.UpsampleConv` (nearest x2 upsampling, then a 3x3 conv) takes its form by input
size (its `conv_min_side`; `diffusion_jax.hardware.CPU_UPSAMPLE_CONV_MIN_SIDE` on the CPU). This script
compiles both forms of the layer
in one process and alternates the calls; times are medians, ratios are convolution / matmuls (below 1:
the convolution is faster). "forward_and_gradients" is the layer's forward pass and its gradients with
respect to input and parameters, as in a train step.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# [batch, height = width, channels] of the layer's inputs (as many output channels): the default
# config's UNet (guided batch 16, training batch 32) and VAE (8 images), a UNet at 8x8x128, the small
# benchmark UNet at batch 8, SD 1.5's UNet at batch 2 (guided sampling) and 1 (training), SD's VAE
# decoder at 512x512.
SHAPES = [(16, 4, 64), (16, 8, 64), (32, 8, 64), (8, 16, 32), (8, 32, 32),
          (8, 8, 128), (8, 8, 256), (8, 16, 256),
          (2, 8, 1280), (2, 16, 1280), (2, 32, 640), (1, 8, 1280), (1, 16, 1280), (1, 32, 640),
          (1, 64, 512), (1, 128, 512), (1, 256, 256)]
# Shapes whose gradients are not timed: the VAE decoder is not trained at 512x512 here.
FORWARD_ONLY = {(1, 64, 512), (1, 128, 512), (1, 256, 256)}


def both_forms(batch: int, size: int, channels: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax.linen import meta

  import diffusion_jax
  from diffusion_jax.nn import layers

  x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
  forms = {"convolution": layers.UpsampleConv(channels, conv_min_side=1),
           "matmuls": layers.UpsampleConv(channels, conv_min_side=0)}
  params = meta.unbox(jax.eval_shape(forms["matmuls"].init, jax.random.key(1), x))
  params = jax.tree.map(lambda a: 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)

  def forward(module):  # [B, H, W, C] -> [B, 2H, 2W, C]
    return module.apply

  def forward_and_gradients(module):
    def fn(p, x):
      y, vjp = jax.vjp(module.apply, p, x)
      return (y, *vjp(jnp.sin(y)))
    return fn

  out = {"shape": [batch, size, size, channels]}
  kinds = {"forward": forward}
  if (batch, size, channels) not in FORWARD_ONLY:
    kinds["forward_and_gradients"] = forward_and_gradients
  for kind, make in kinds.items():
    programs = {form: diffusion_jax.jit(make(module)).lower(params, x).compile() for form, module in forms.items()}
    ms = common.alternate(programs, (params, x), repeats)
    out[kind] = {"convolution_ms": round(ms["convolution"], 2), "matmuls_ms": round(ms["matmuls"], 2),
                 "convolution_over_matmuls": round(ms["convolution"] / ms["matmuls"], 3)}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=7, help="alternating timed calls per program (median)")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "upsample.json"))
  args = parser.parse_args()

  jax = common.start_on_cpu(parser, "the CPU forms of the layer")
  from diffusion_jax import hardware
  result = {"jax": jax.__version__, "load_average_at_start": common.load_average(),
            "cpu_upsample_conv_min_side": hardware.CPU_UPSAMPLE_CONV_MIN_SIDE, "shapes": []}
  for batch, size, channels in SHAPES:
    row = both_forms(batch, size, channels, args.repeats)
    print(row, flush=True)
    result["shapes"].append(row)
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
