"""Attention forward + backward at the small UNet's shapes: our CPU tiled attention against torch's SDPA.

  python benchmarks/attention.py --out benchmarks/results/attention-xeon.json

Ours: `diffusion_jax.nn.attention.tiled_attention` (what the UNet runs on the CPU) under `jax.vjp`, one
compiled program per shape. Torch: `torch.nn.functional.scaled_dot_product_attention` then `backward`,
run by the peer's python (diffusers' CPU flash attention kernel is what the torch UNet calls). Both
take [B, T, heads, Dh] queries and [B, S, heads, Dh] keys and values in float32; times are medians of
`--repeats` calls after one warm-up, each system in its own subprocess, and ratios are ours / torch.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (batch, queries, heads, head dim, keys): the small UNet's self- and cross-attention at its 32x32 and
# 16x16 levels (five layers of each kind there), batch 8, 77 text tokens.
SHAPES = [(8, 1024, 8, 16, 1024), (8, 1024, 8, 16, 77), (8, 256, 8, 32, 256), (8, 256, 8, 32, 77)]

TORCH_WORKER = r"""
import json, sys, time, torch
import torch.nn.functional as F
b, t, n, dh, s = (int(v) for v in sys.argv[1].split(","))
repeats = int(sys.argv[2])
q = torch.randn(b, n, t, dh, requires_grad=True)
k, v = (torch.randn(b, n, s, dh, requires_grad=True) for _ in range(2))
g = torch.randn(b, n, t, dh)
def step():
    F.scaled_dot_product_attention(q, k, v).backward(g)
step(); times = []
for _ in range(repeats):
    start = time.perf_counter(); step(); times.append((time.perf_counter() - start) * 1e3)
times.sort()
print("BENCH_RESULT " + json.dumps({"ms": times[len(times) // 2], "threads": torch.get_num_threads(),
                                    "torch": torch.__version__}), flush=True)
"""


def worker_ours(shape: str, repeats: int) -> dict:
  """Median ms of our attention's forward and backward at one shape."""
  import jax

  from diffusion_jax import xla_options
  from diffusion_jax.nn import attention

  b, t, n, dh, s = (int(v) for v in shape.split(","))
  keys = jax.random.split(jax.random.key(0), 4)
  q, d_out = (jax.random.normal(key, (b, t, n, dh)) for key in keys[:2])
  k, v = (jax.random.normal(key, (b, s, n, dh)) for key in keys[2:])

  def forward_and_backward(q, k, v, d_out):
    _, vjp = jax.vjp(attention.tiled_attention, q, k, v)
    return vjp(d_out)

  program = jax.jit(forward_and_backward, compiler_options=xla_options.compiler_options()).lower(
      q, k, v, d_out).compile()
  ms = common.median_ms(lambda: jax.block_until_ready(program(q, k, v, d_out)), repeats)
  return {"ms": ms, "jax": jax.__version__, "tile_elements": attention.CPU_TILE_ELEMENTS}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=15, help="timed calls per shape and system (median)")
  parser.add_argument("--peer-torch-python", default="/tmp/peer-torch/bin/python")
  parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results", "attention.json"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one shape of ours, in a subprocess
  args = parser.parse_args()
  if args.worker:
    common.start_on_cpu(parser, "the CPU attention")
    common.emit(worker_ours(args.worker, args.repeats))
    return

  result = {"load_average_at_start": common.load_average(), "shapes": []}
  for shape in SHAPES:
    spec = ",".join(map(str, shape))
    ours = common.run_worker([sys.executable, os.path.abspath(__file__), "--worker", spec,
                              "--repeats", str(args.repeats)])
    if os.path.exists(args.peer_torch_python):
      torch = common.run_worker([args.peer_torch_python, "-c", TORCH_WORKER, spec, str(args.repeats)])
    else:
      torch = {"error": f"no peer python at {args.peer_torch_python}"}
    row = {"batch_queries_heads_head_dim_keys": list(shape), "ours": ours, "torch": torch}
    if "ms" in ours and "ms" in torch:
      row["ours_over_torch"] = round(ours["ms"] / torch["ms"], 3)
    print(row, flush=True)
    result["shapes"].append(row)
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
