"""Attention forward + backward at the UNets' shapes: our CPU attention against torch's SDPA.

  python benchmarks/attention.py --out benchmarks/results/attention-kernel-xeon.json

Ours, both CPU implementations under `jax.vjp`, compiled in one process with the calls alternating:
the fused kernel (`diffusion_jax.nn.cpu_attention.attention`, attention="cpu_kernel", what
`diffusion_jax.hardware` chooses on one CPU device) and the XLA tiles
(`diffusion_jax.nn.attention.tiled_attention`, attention="cpu_tiles", the fallback). Torch: `torch.nn.functional.scaled_dot_product_attention` then `backward`,
run by the peer's python (diffusers' CPU flash attention kernel is what the torch UNet calls). Both
take [B, T, heads, Dh] queries and [B, S, heads, Dh] keys and values in float32; times are medians of
`--repeats` calls after one warm-up, ours and torch in their own subprocesses, and ratios are ours / torch.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (batch, queries, heads, head dim, keys): the small UNet's self- and cross-attention at its 32x32 and
# 16x16 levels (five layers of each kind there), batch 8, 77 text tokens; then SD 1.5's self-attention
# at its 64x64 level (five layers), batch 1.
SHAPES = [(8, 1024, 8, 16, 1024), (8, 1024, 8, 16, 77), (8, 256, 8, 32, 256), (8, 256, 8, 32, 77),
          (1, 4096, 8, 40, 4096)]

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
  """Median ms of the forward and backward of both our CPU attentions at one shape, calls alternating."""
  import jax

  import diffusion_jax
  from diffusion_jax.nn import attention, cpu_attention

  b, t, n, dh, s = (int(v) for v in shape.split(","))
  keys = jax.random.split(jax.random.key(0), 4)
  q, d_out = (jax.random.normal(key, (b, t, n, dh)) for key in keys[:2])
  k, v = (jax.random.normal(key, (b, s, n, dh)) for key in keys[2:])
  implementations = {"tiles": attention.tiled_attention}
  if cpu_attention.available():
    implementations["kernel"] = cpu_attention.attention

  def compiled(fn):
    def forward_and_backward(q, k, v, d_out):
      _, vjp = jax.vjp(fn, q, k, v)
      return vjp(d_out)
    return diffusion_jax.jit(forward_and_backward).lower(q, k, v, d_out).compile()

  programs = {name: compiled(fn) for name, fn in implementations.items()}
  result = {f"{name}_ms": ms for name, ms in common.alternate(programs, (q, k, v, d_out), repeats).items()}
  return {**result, "jax": jax.__version__, "tile_elements": attention.CPU_TILE_ELEMENTS}


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
    for name in ("kernel", "tiles"):
      if f"{name}_ms" in ours and "ms" in torch:
        row[f"{name}_over_torch"] = round(ours[f"{name}_ms"] / torch["ms"], 3)
    print(row, flush=True)
    result["shapes"].append(row)
  common.write_json(result, args.out)


if __name__ == "__main__":
  main()
