"""A Dense layer's forward and backward on the CPU: one matmul over merged rows, or over [B, T, C] as nn.Dense.

  python benchmarks/dense.py --out benchmarks/results/dense.json

`diffusion_jax.nn.layers.Dense` merges the leading axes of its input and runs one [rows, C] x [C, O]
matmul (`layers.matmul_rows`). `nn.Dense` contracts the last axis of the [B, T, C] input directly;
autodiff then forms the kernel gradient over 3D operands, and XLA transposes the output gradient
first, fused with the elementwise work that produced it. Each shape's layer follows an elementwise
producer (tanh(a) * b + c, as a norm's output) and feeds one (sin), so the fusions look like the
UNet's. Both forms are compiled in one process and the calls alternate; times are medians, and
ratios are rows merged / [B, T, C] (below 1: merged is faster).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# [B, T, C] -> O: the small UNet's projections at 32x32 and 16x16 and its 32x32 GEGLU projection,
# and the default config's at its 16x16 level (batch 32).
SHAPES = [(8, 1024, 128, 128), (8, 256, 256, 256), (8, 1024, 128, 1024), (32, 256, 64, 64)]


def both_forms(batch: int, tokens: int, channels: int, features: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from diffusion_jax import xla_options
  from diffusion_jax.nn import layers

  keys = jax.random.split(jax.random.key(0), 5)
  a, b, c = (jax.random.normal(key, (batch, tokens, channels)) for key in keys[:3])
  kernel = 0.05 * jax.random.normal(keys[3], (channels, features))
  weights = jax.random.normal(keys[4], (batch, tokens, features))

  def gradients(matmul):
    def loss(a, kernel):
      y = matmul(jnp.tanh(a) * b + c, kernel)  # [B, T, O]
      return jnp.sum(jnp.sin(y) * weights)
    return jax.grad(loss, argnums=(0, 1))

  forms = {"rows_merged": layers.matmul_rows, "batch_tokens_channels": jnp.dot}
  programs = {name: jax.jit(gradients(fn), compiler_options=xla_options.compiler_options()).lower(a, kernel).compile()
              for name, fn in forms.items()}
  ms = common.alternate(programs, (a, kernel), repeats)
  return {"shape": [batch, tokens, channels], "features": features,
          **{f"{name}_ms": round(value, 2) for name, value in ms.items()},
          "merged_over_3d": round(ms["rows_merged"] / ms["batch_tokens_channels"], 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=21, help="alternating timed calls per form (median)")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "dense.json"))
  args = parser.parse_args()

  jax = common.start_on_cpu(parser, "the CPU forms of the layer")
  result = {"jax": jax.__version__, "load_average_at_start": common.load_average(), "shapes": []}
  for shape in SHAPES:
    row = both_forms(*shape, args.repeats)
    print(row, flush=True)
    result["shapes"].append(row)
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
