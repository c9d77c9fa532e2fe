"""The compiler options every program gets on the CPU, and the train step's scheduler choice."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import xla_options

CONV_TO_XLA = "xla_cpu_experimental_ynn_fusion_type"


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


def test_cpu_programs_keep_convolutions_with_xla_and_matmuls_with_the_library():
  options = xla_options.compiler_options(backend="cpu")
  assert options.get(CONV_TO_XLA) == xla_options.BASE["cpu"][CONV_TO_XLA], "this jaxlib accepts the option"
  args = _conv_args()
  grad_fn = jax.grad(lambda x, w, v: jnp.sum(_conv_and_dense(x, w, v) ** 2), argnums=(0, 1, 2))
  tuned = jax.jit(grad_fn, compiler_options=options).lower(*args).compile()
  default = jax.jit(grad_fn).lower(*args).compile()
  # Forward, input-gradient and weight-gradient convolutions leave the library's fusions (XLA names
  # them "ynn_fusion"); the matmuls stay in them.
  assert _library_ops(default.as_text()).count("convolution") >= 3
  assert "convolution" not in _library_ops(tuned.as_text())
  assert "dot" in _library_ops(tuned.as_text())
  for got, want in zip(tuned(*args), default(*args)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_options_this_xla_does_not_know_are_left_out(monkeypatch):
  monkeypatch.setitem(xla_options.BASE, "cpu", {"xla_cpu_no_such_option": "1", CONV_TO_XLA: "NOT_A_FUSION_TYPE"})
  assert xla_options.compiler_options(backend="cpu") == {}
  assert xla_options.compiler_options("memory", backend="cpu") == dict(xla_options.SCHEDULERS["memory"]["cpu"])


def test_other_backends_get_no_cpu_options_and_unknown_schedulers_fail():
  assert xla_options.compiler_options("memory", "tpu") == {}
  assert xla_options.compiler_options("default", "gpu") == {}
  with pytest.raises(ValueError, match="unknown XLA scheduler"):
    xla_options.compiler_options("fastest")


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
  options = xla_options.compiler_options("memory", "cpu")
  assert "xla_cpu_scheduler_type" in options, "the CPU backend has a memory-optimised scheduler"
  # Donated, as the training loop compiles its step (the update is then written in place).
  default = jax.jit(train_step, donate_argnums=(0, 1),
                    compiler_options=xla_options.compiler_options("default", "cpu")).lower(*args).compile()
  tuned = jax.jit(train_step, donate_argnums=(0, 1), compiler_options=options).lower(*args).compile()
  assert tuned.memory_analysis().temp_size_in_bytes < 0.85 * default.memory_analysis().temp_size_in_bytes
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  expected, got = default(*copy(args)), tuned(*copy(args))
  np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in jax.tree.leaves(got)]),
                             np.concatenate([np.ravel(a) for a in jax.tree.leaves(expected)]), rtol=1e-6, atol=1e-7)
