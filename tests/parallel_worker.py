"""Subprocess side of tests/test_parallel.py (JAX reads the device count at import time).

  python tests/parallel_worker.py mesh --out result.json
      8 forced CPU devices: sharding of a tiny model on a data=2 x fsdp=4 mesh, 3 Adam
      steps on that mesh and on one device.
  python tests/parallel_worker.py multihost --process-id I --num-processes N --port P --out f
      one of N processes (2 CPU devices each) joined by jax.distributed over gloo.

XLA_FLAGS (the device count) is set by the caller before this interpreter starts.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import parallel

DENSE = ("embed", "mlp")
CONV = ("conv_h", "conv_w", "embed", "mlp")
GLOBAL_BATCH = 16
STEPS = 3


def named(init, names):
  return nn.with_logical_partitioning(init, names)


class TinyNet(nn.Module):
  """Conv + embedding + MLP, every parameter named as the networks name them."""

  @nn.compact
  def __call__(self, images, tokens):  # [B, 8, 8, 3], [B, L]
    conv = lambda f, name: nn.Conv(f, (3, 3), name=name,
                                   kernel_init=named(nn.initializers.lecun_normal(), CONV),
                                   bias_init=named(nn.initializers.normal(0.1), ("mlp",)))
    dense = lambda f, name: nn.Dense(f, name=name,
                                     kernel_init=named(nn.initializers.lecun_normal(), DENSE),
                                     bias_init=named(nn.initializers.normal(0.1), ("mlp",)))
    h = conv(16, "conv_in")(images)  # 3 input channels: not divisible by fsdp=4
    h = nn.with_logical_constraint(h, ("batch", "height", "width", "channels"))
    h = conv(32, "conv_mid")(nn.silu(h))
    h = h.mean(axis=(1, 2))  # [B, 32]
    table = self.param("token_embedding", named(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (10, 16))
    pos = self.param("position_embedding", named(nn.initializers.normal(0.1), ("pos", "embed")),
                     (tokens.shape[1], 16))
    t = (table[tokens] + pos).mean(axis=1)  # [B, 16]
    t = nn.LayerNorm(name="norm", scale_init=named(nn.initializers.ones, ("norm",)),
                     bias_init=named(nn.initializers.zeros, ("norm",)))(t)
    scale = self.param("logit_scale", named(nn.initializers.constant(1.5), ()), ())
    offset = self.param("offset", nn.initializers.normal(0.1), (6,))  # no logical names
    h = jnp.concatenate([h, t * scale], axis=-1)  # [B, 48]
    h = dense(64, "fc1")(h)
    h = nn.with_logical_constraint(h, ("batch", "channels"))
    return dense(6, "fc2")(nn.gelu(h)) + offset  # [B, 6]


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "images": rng.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
      "tokens": rng.integers(0, 10, size=(GLOBAL_BATCH, 5)).astype(np.int32),
      "target": rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32),
  }


MODEL = TinyNet()
TX = optax.adam(1e-2)


def init_fn(rng, images, tokens):
  return MODEL.init(rng, images, tokens)["params"]


def train_step(state, batch):
  def loss_fn(params):
    pred = MODEL.apply({"params": params}, batch["images"], batch["tokens"])
    return jnp.mean((pred - batch["target"]) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def train_sharded(mesh, local_batches):
  """Shape-first init + jitted step with explicit shardings, as train.py does it."""
  example = make_data()
  rng = jax.random.key(0)
  params, p_shard = parallel.init_sharded(init_fn, mesh, parallel.LOGICAL_AXIS_RULES, rng,
                                          example["images"][:1], example["tokens"][:1])
  o_shard = parallel.optimizer_shardings(TX, params, p_shard, mesh)
  opt_state = jax.jit(TX.init, out_shardings=o_shard)(params)
  state_shard = {"params": p_shard, "opt_state": o_shard}
  batch_shard = parallel.batch_sharding(mesh)
  with parallel.sharding_context(mesh):
    step = jax.jit(train_step, in_shardings=(state_shard, batch_shard),
                   out_shardings=(state_shard, parallel.replicated(mesh)), donate_argnums=0)
    state, losses = {"params": params, "opt_state": opt_state}, []
    for local in local_batches:
      state, loss = step(state, parallel.make_global_batch(local, mesh))
      losses.append(float(loss))
  return params, p_shard, o_shard, state, losses


def train_one_device(batches):
  """Reference: plain jit on one device, no mesh, no shardings."""
  example = make_data()
  params = nn.meta.unbox(jax.jit(init_fn)(jax.random.key(0), example["images"][:1],
                                          example["tokens"][:1]))
  state = {"params": params, "opt_state": TX.init(params)}
  step, losses = jax.jit(train_step), []
  for batch in batches:
    state, loss = step(state, batch)
    losses.append(float(loss))
  return losses


def batches_for_steps():
  return [make_data(seed) for seed in range(STEPS)]


def run_mesh():
  assert jax.device_count() == 8, jax.devices()
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
  params, p_shard, o_shard, state, losses = train_sharded(mesh, batches_for_steps())

  leaves = {}
  planned = jax.tree.leaves(p_shard)
  for (path, x), plan in zip(jax.tree_util.tree_flatten_with_path(state["params"])[0], planned):
    name = "/".join(k.key for k in path)
    leaves[name] = {
        "shape": list(x.shape),
        "spec": [None if a is None else (a if isinstance(a, str) else list(a))
                 for a in x.sharding.spec],
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "num_shards": len(x.addressable_shards),
        "matches_plan": x.sharding.is_equivalent_to(plan, x.ndim),
    }
  mu = state["opt_state"][0].mu
  batch = parallel.make_global_batch(make_data(), mesh)
  errors = {}
  try:
    parallel.make_global_batch({"x": np.zeros((12, 2), np.float32)}, mesh)
  except ValueError as e:
    errors["batch"] = str(e)
  try:
    parallel.make_mesh({"data": 3, "fsdp": -1})
  except ValueError as e:
    errors["mesh"] = str(e)
  return {
      "mesh_shape": dict(mesh.shape),
      "leaves": leaves,
      "mu_conv_mid_spec": str(mu["conv_mid"]["kernel"].sharding.spec),
      "count_spec": str(state["opt_state"][0].count.sharding.spec),
      "batch_shard_shapes": sorted({tuple(s.data.shape)
                                    for s in batch["images"].addressable_shards}),
      "batch_spec": str(batch["images"].sharding.spec),
      "describe": parallel.describe(state["params"]),
      "losses": losses,
      "reference_losses": train_one_device(batches_for_steps()),
      "errors": errors,
  }


def run_multihost(process_id, num_processes, port):
  started = parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  again = parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  mesh = parallel.make_mesh({"data": num_processes, "fsdp": -1})
  rows = GLOBAL_BATCH // num_processes
  # Each process loads only its own slice of every global batch, as a sharded data loader does.
  local_batches = [jax.tree.map(lambda x: x[process_id * rows:(process_id + 1) * rows], b)
                   for b in batches_for_steps()]
  _, _, _, state, losses = train_sharded(mesh, local_batches)
  kernel = state["params"]["fc1"]["kernel"]
  return {
      "started": started, "again": again,
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(), "devices": jax.device_count(),
      "mesh_shape": dict(mesh.shape),
      "fc1_spec": str(kernel.sharding.spec),
      "fc1_local_shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
      "losses": losses,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["mesh", "multihost"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()
  if args.mode == "mesh":
    result = run_mesh()
  else:
    result = run_multihost(args.process_id, args.num_processes, args.port)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
