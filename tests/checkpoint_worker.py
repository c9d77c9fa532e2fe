"""Subprocess side of tests/test_checkpoint.py.

  python tests/checkpoint_worker.py kill DIR
      saves step 1 and waits for it, starts an asynchronous save of a larger step 2,
      prints SAVING and sleeps: the test kills it (SIGKILL) in the middle of that save.
  python tests/checkpoint_worker.py sharded DIR --out result.json
      8 forced CPU devices (XLA_FLAGS set by the caller): saves parameters sharded
      on a data=2 x fsdp=4 mesh, restores them onto that mesh, onto fsdp=8, and replicated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.checkpoint import Checkpointer


def tree_for_step(step: int, num_arrays: int, shape: tuple[int, ...]) -> dict:
  """Deterministic contents, so the test can recompute what step `step` held."""
  rng = np.random.default_rng(step)
  return {f"w{i:03d}": rng.normal(size=shape).astype(np.float32) for i in range(num_arrays)}


SMALL = (4, (16, 16))      # step 1: the checkpoint that must survive
LARGE = (64, (128, 1024))  # step 2: 32 MiB, takes about a second to write


def run_kill(directory: str) -> None:
  ckpt = Checkpointer(directory, max_to_keep=2)
  ckpt.save(1, {"unet": tree_for_step(1, *SMALL)}, rng=jax.random.key(1), config={"step": 1})
  ckpt.wait()
  large = jax.tree.map(jnp.asarray, tree_for_step(2, *LARGE))
  ckpt.save(2, {"unet": large}, rng=jax.random.key(2), config={"step": 2})
  print("SAVING", flush=True)  # the background write of step 2 is now running
  time.sleep(600)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, 8, 8, 3]
    x = nn.Conv(16, (3, 3), kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_h", "conv_w", "embed", "mlp")))(x)
    x = nn.Conv(32, (3, 3), kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_h", "conv_w", "embed", "mlp")))(x)
    return nn.Dense(64, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")))(x.mean(axis=(1, 2)))


def _describe(tree) -> dict:
  return {"/".join(str(k.key) for k in path): {
      "spec": str(x.sharding.spec) if hasattr(x.sharding, "spec") else type(x.sharding).__name__,
      "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
      "devices": len(x.sharding.device_set)}
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_sharded(directory: str) -> dict:
  assert jax.device_count() == 8
  init = lambda rng: Net().init(rng, jnp.zeros((1, 8, 8, 3)))["params"]
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  params, shardings = parallel.init_sharded(init, mesh, parallel.LOGICAL_AXIS_RULES,
                                            jax.random.key(0))
  with Checkpointer(directory) as ckpt:
    ckpt.save(5, {"unet": params})

  abstract = jax.eval_shape(init, jax.random.key(0))
  result = {"saved": _describe(params)}
  with Checkpointer(directory) as ckpt:
    for name, target_mesh in (("same", mesh), ("fsdp8", parallel.make_mesh({"fsdp": 8}))):
      target = parallel.with_shardings(abstract, parallel.param_shardings(abstract, target_mesh))
      restored = ckpt.restore(abstract_items={"unet": target}).items["unet"]
      result[name] = _describe(restored)
      result[name + "_equal"] = all(
          np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)))
    restored = ckpt.restore().items["unet"]  # no target: replicated everywhere
    result["replicated"] = _describe(restored)
    result["replicated_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)))
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["kill", "sharded"])
  parser.add_argument("directory")
  parser.add_argument("--out")
  args = parser.parse_args()
  if args.mode == "kill":
    run_kill(args.directory)
    sys.exit(1)  # not reached: the test kills this process
  with open(args.out, "w") as f:
    json.dump(run_sharded(args.directory), f, indent=1)


if __name__ == "__main__":
  main()
