"""XLA's CPU convolutions against YNNPACK's, per UNet/VAE shape and on whole UNet programs.

  python benchmarks/cpu_convolutions.py --out benchmarks/results/cpu-convolutions.json
  python benchmarks/cpu_convolutions.py --shapes '' --unet small,sd15 --out /tmp/cpu-conv-unet.json

jaxlib 0.10.2's XLA hands convolutions to YNNPACK by default; `diffusion_jax.xla_options` keeps them on
XLA's own kernels. Each comparison compiles the same program both ways in one process and alternates
the calls, so the machine's drift hits both alike; times are medians. Ratios are ours / default
(below 1: ours is faster).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# [batch, height = width, channels] of 3x3 convolutions: the small UNet at batch 8, SD 1.5's UNet at
# batch 2 (guided sampling) and 1 (training), SD's VAE decoder at 512x512.
SHAPES = [(8, 32, 128), (8, 16, 256), (8, 8, 256), (2, 64, 320), (2, 32, 640), (2, 16, 1280), (2, 8, 1280),
          (1, 64, 320), (1, 32, 640), (1, 16, 1280), (1, 128, 256), (1, 256, 128)]


def both_ways(fn, args: tuple, options: dict, repeats: int, base: dict | None = None) -> dict:
  """`fn` compiled with `base` options alone ("default") and with `options` on top ("ours"), timed alternately."""
  import jax
  base = base or {}
  programs = {"default": jax.jit(fn, compiler_options=base).lower(*args).compile(),
              "ours": jax.jit(fn, compiler_options={**base, **options}).lower(*args).compile()}
  ms = common.alternate(programs, args, repeats)
  return {"default_ms": round(ms["default"], 2), "ours_ms": round(ms["ours"], 2),
          "ours_over_default": round(ms["ours"] / ms["default"], 3)}


def conv_shapes(shapes, options: dict, repeats: int) -> list[dict]:
  import jax
  dims = ("NHWC", "HWIO", "NHWC")

  def conv(x, w):  # [B, H, W, C] -> [B, H, W, C]
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

  def forward_and_gradients(x, w, dy):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(dy))

  rows = []
  for batch, size, channels in shapes:
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
    row = {"shape": [batch, size, size, channels], "gflop_fwd": 2 * batch * size * size * channels ** 2 * 9 / 1e9,
           "forward": both_ways(conv, (x, w), options, repeats),
           "forward_and_gradients": both_ways(forward_and_gradients, (x, w, x), options, repeats)}
    print(row, flush=True)
    rows.append(row)
  return rows


def unet_programs(name: str, options: dict, repeats: int, train: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax.linen import meta

  import unet as unet_bench
  from diffusion_jax import hardware, xla_options
  from diffusion_jax.nn.unet import UNet, UNetConfig

  ref_cfg, batch, seq = unet_bench.CONFIGS[name]
  # The implementation choices the pipeline and training make for these devices.
  model = UNet(hardware.configure(UNetConfig(**ref_cfg, remat=unet_bench.DEFAULT_REMAT[name]), force=True))
  size = ref_cfg["sample_size"]
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 4))
  t = jnp.arange(batch) * 7
  context = jax.random.normal(jax.random.key(2), (batch, seq, ref_cfg["cross_attention_dim"]))
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), x, t, context)["params"])
  out = {"forward": both_ways(lambda p: model.apply({"params": p}, x, t, context), (params,), options, repeats)}
  print(name, out, flush=True)
  if train:
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def train_step(p, opt_state):
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x, t, context) - x) ** 2))(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    # The scheduler's own options only: compiler_options() would bring the options under test too.
    scheduler = xla_options.SCHEDULERS[unet_bench.DEFAULT_SCHEDULER[name]].get(jax.default_backend(), {})
    out["train"] = both_ways(train_step, (params, tx.init(params)), options, repeats, base=scheduler)
    print(name, out, flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="all", help="'all' or '' (skip the per-shape convolutions)")
  parser.add_argument("--unet", default="small", help="comma-separated UNet configurations: small, sd15 ('' for none)")
  parser.add_argument("--unet-train", default="small",
                      help="configurations whose train step is timed too (two SD 1.5 steps need more than 24 GiB)")
  parser.add_argument("--repeats", type=int, default=7, help="alternating timed calls per program (median)")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "cpu-convolutions.json"))
  args = parser.parse_args()

  jax = common.start_on_cpu(parser, "CPU convolution kernels")
  from diffusion_jax import xla_options
  options = xla_options.compiler_options()
  if not options:
    parser.error("this jaxlib's XLA does not accept the options in diffusion_jax.xla_options.BASE['cpu']")
  result = {"jax": jax.__version__, "options": options, "load_average_at_start": common.load_average(),
            "convolutions": conv_shapes(SHAPES, options, args.repeats) if args.shapes == "all" else [],
            "unet": {}}
  train = set(filter(None, args.unet_train.split(",")))
  for name in filter(None, args.unet.split(",")):
    result["unet"][name] = unet_programs(name, options, args.repeats, name in train)
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
