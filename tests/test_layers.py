"""Shared layers: the fused nearest-upsample + conv equals upsampling then a 3x3 conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from diffusion_jax.nn.layers import Conv, Upsample


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 1, 1, 3), (3, 4, 4, 8)])
def test_upsample_equals_nearest_then_conv(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  module = Upsample(5)
  params = meta.unbox(module.init(jax.random.key(1), x))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)  # non-zero bias
  assert jax.tree.map(jnp.shape, params) == {"params": {"conv": {"kernel": (3, 3, shape[-1], 5), "bias": (5,)}}}

  def reference(p, x):  # [B, H, W, C] -> [B, 2H, 2W, 5]
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(5, 3).apply({"params": p["params"]["conv"]}, up)

  ours, ref = module.apply(params, x), reference(params, x)
  assert ours.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(fn(p, x))), argnums=(0, 1))(params, x)

  for a, b in zip(jax.tree.leaves(loss(module.apply)), jax.tree.leaves(loss(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
