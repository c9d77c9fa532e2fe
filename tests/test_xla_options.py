"""The compiler options every program gets on the CPU, the train step's scheduler choice, and
`diffusion_jax.jit`, which adds them to a user's program."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffusion_jax
from diffusion_jax import xla_options

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's options")


def _conv_and_dense(x, w, v):  # [B, H, W, C] -> 3x3 conv -> dense over channels
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(y) @ v


def _conv_args():
  kx, kw, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (2, 16, 16, 32)), jax.random.normal(kw, (3, 3, 32, 32)) * 0.1,
          jax.random.normal(kv, (32, 32)) * 0.1)


def _library_ops(hlo: str) -> list[str]:
  """The opcodes inside the computations that library fusions call, from compiled HLO text."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name and line.strip() == "}":
      name = None
    elif name:
      bodies[name].append(line)
  called = re.findall(r"%ynn_fusion[\w.]* = .*?calls=%([\w.\-]+)", hlo)
  return [op for c in called for op in re.findall(r"= \S+ ([a-z\-]+)\(", "\n".join(bodies.get(c, [])))]


@on_cpu
def test_cpu_programs_keep_convolutions_with_xla_and_matmuls_with_the_library():
  args = _conv_args()
  grad_fn = jax.grad(lambda x, w, v: jnp.sum(_conv_and_dense(x, w, v) ** 2), argnums=(0, 1, 2))
  tuned = jax.jit(grad_fn, compiler_options=xla_options.compiler_options()).lower(*args).compile()
  users = diffusion_jax.jit(grad_fn).lower(*args).compile()  # the same options, for users' programs
  default = jax.jit(grad_fn).lower(*args).compile()
  # Forward, input-gradient and weight-gradient convolutions leave the library's fusions (XLA names
  # them "ynn_fusion"); the matmuls stay in them.
  assert _library_ops(default.as_text()).count("convolution") >= 3
  for program in (tuned, users):
    assert "convolution" not in _library_ops(program.as_text())
    assert "dot" in _library_ops(program.as_text())
  for got, want in zip(users(*args), default(*args)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_every_option_given_compiles_and_unknown_ones_are_left_out():
  for scheduler in xla_options.SCHEDULERS:
    options = xla_options.compiler_options(scheduler)
    for name, value in options.items():
      assert xla_options._accepted(jax.default_backend(), name, value)
    jax.jit(lambda x: x * 2, compiler_options=options).lower(jnp.ones(3)).compile()
  assert not xla_options._accepted(jax.default_backend(), "xla_no_such_option", "1")


def test_other_backends_get_no_cpu_options_and_unknown_schedulers_fail():
  for backend in ("tpu", "gpu"):
    assert not [name for name in xla_options.compiler_options("memory", backend) if name.startswith("xla_cpu")]
  with pytest.raises(ValueError, match="unknown XLA scheduler"):
    xla_options.compiler_options("fastest")
  with pytest.raises(ValueError, match="unknown XLA scheduler"):
    diffusion_jax.jit(lambda x: x, scheduler="fastest")


def test_jit_is_jax_jit_with_the_options_and_its_arguments():
  assert diffusion_jax.jit is xla_options.jit and "jit" in diffusion_jax.__all__
  scaled = diffusion_jax.jit(lambda x, n: x * n, static_argnums=1, compiler_options={"xla_embed_ir_in_executable": True})
  np.testing.assert_array_equal(scaled(jnp.arange(3.0), 2), [0.0, 2.0, 4.0])
  # A user's call of a model's apply: the same output as plain jax.jit.
  from flax.linen import meta

  from diffusion_jax.nn.unet import UNet, UNetConfig
  cfg = UNetConfig(block_out_channels=(16,), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
                   norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",), mid_block_type=None,
                   up_block_types=("CrossAttnUpBlock2D",))
  model = UNet(cfg)
  x, t, c = jnp.ones((1, 8, 8, 4)), jnp.ones((1,)), jnp.ones((1, 3, 8))
  params = meta.unbox(model.init(jax.random.key(0), x, t, c)["params"])
  apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  np.testing.assert_allclose(np.asarray(diffusion_jax.jit(apply)(params, x, t, c)),
                             np.asarray(jax.jit(apply)(params, x, t, c)), rtol=1e-5, atol=1e-6)


@on_cpu
def test_memory_scheduler_updates_parameters_as_their_gradients_arrive():
  # A deep MLP's AdamW step: with the memory-optimised scheduler the gradients are not all alive at
  # once, so XLA needs fewer temporaries; the result is the same.
  def loss(params, x):
    for w in params:
      x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)

  tx = optax.adamw(1e-3)

  def train_step(params, opt_state, x):
    updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  keys = jax.random.split(jax.random.key(0), 13)
  params = [jax.random.normal(k, (512, 512)) / 512 ** 0.5 for k in keys[:12]]
  args = (params, tx.init(params), jax.random.normal(keys[12], (64, 512)))
  # Donated, as the training loop compiles its step (the update is then written in place).
  default = diffusion_jax.jit(train_step, donate_argnums=(0, 1)).lower(*args).compile()
  tuned = diffusion_jax.jit(train_step, scheduler="memory", donate_argnums=(0, 1)).lower(*args).compile()
  assert tuned.memory_analysis().temp_size_in_bytes < 0.85 * default.memory_analysis().temp_size_in_bytes
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  expected, got = default(*copy(args)), tuned(*copy(args))
  np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in jax.tree.leaves(got)]),
                             np.concatenate([np.ravel(a) for a in jax.tree.leaves(expected)]), rtol=1e-6, atol=1e-7)
