"""Shared layers: Dense equals nn.Dense; the fused nearest-upsample + conv equals upsampling then a 3x3 conv;
GroupNorm and GELU against torch."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from flax.linen import meta

from diffusion_jax.nn import layers
from diffusion_jax.nn.layers import Conv, Dense, GroupNorm, Upsample, gelu


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 5), (2, 3, 4, 5)])
def test_dense_equals_flax_dense(shape, use_bias):
  # Dense merges the leading axes into one matmul; parameters, outputs and gradients must be nn.Dense's.
  x = jax.random.normal(jax.random.key(0), shape)
  params = meta.unbox(Dense(3, use_bias=use_bias).init(jax.random.key(1), x))
  expected = {"kernel": (5, 3), "bias": (3,)} if use_bias else {"kernel": (5, 3)}
  assert jax.tree.map(jnp.shape, params) == {"params": expected}
  boxed = Dense(3, use_bias=use_bias).init(jax.random.key(1), x)["params"]["kernel"]
  assert boxed.names == layers.DENSE_AXES  # the sharding rules find the kernel's logical axes
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  reference = nn.Dense(3, use_bias=use_bias)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

  ours = Dense(3, use_bias=use_bias).apply(params, x)
  assert ours.shape == shape[:-1] + (3,)
  np.testing.assert_allclose(ours, reference.apply(params, x), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads(Dense(3, use_bias=use_bias))), jax.tree.leaves(grads(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["convolution", "matmuls"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 1, 1, 3), (3, 4, 4, 8)])
def test_upsample_equals_nearest_then_conv(shape, form):
  # The config picks the form (by input size); both must give the same layer.
  x = jax.random.normal(jax.random.key(0), shape)
  module = Upsample(5, conv_min_side=1 if form == "convolution" else 0)
  params = meta.unbox(module.init(jax.random.key(1), x))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)  # non-zero bias
  assert jax.tree.map(jnp.shape, params) == {"params": {"conv": {"kernel": (3, 3, shape[-1], 5), "bias": (5,)}}}

  def reference(p, x):  # [B, H, W, C] -> [B, 2H, 2W, 5]
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(5, 3).apply({"params": p["params"]["conv"]}, up)

  convolutions = str(jax.make_jaxpr(module.apply)(params, x)).count("conv_general_dilated")
  assert convolutions == (1 if form == "convolution" else 0)
  ours, ref = module.apply(params, x), reference(params, x)
  assert ours.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(fn(p, x))), argnums=(0, 1))(params, x)

  for a, b in zip(jax.tree.leaves(loss(module.apply)), jax.tree.leaves(loss(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_takes_the_convolution_from_its_minimum_side_and_refuses_auto():
  x = jnp.ones((1, 4, 6, 3))
  forms = {}
  for min_side in (0, 4, 5):
    module = Upsample(5, conv_min_side=min_side)
    params = module.init(jax.random.key(1), x)
    forms[min_side] = "conv_general_dilated" in str(jax.make_jaxpr(module.apply)(params, x))
  assert forms == {0: False, 4: True, 5: False}  # min(h, w) = 4
  with pytest.raises(ValueError, match="hardware.configure"):
    Upsample(5, conv_min_side="auto").init(jax.random.key(1), x)


def _torch_group_norm(x, scale, bias, groups, eps, weights):
  """torch.nn.functional.group_norm on NHWC input: output and gradients of sum(sin(out) * weights)."""
  import torch

  def to_torch(a):  # [B, ..., C] -> [B, C, ...]
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.moveaxis(a, -1, 1).copy()).requires_grad_()

  tx = to_torch(x)
  ts, tb = (torch.tensor(np.asarray(a), requires_grad=True) for a in (scale, bias))
  out = torch.nn.functional.group_norm(tx, groups, ts, tb, eps)
  (torch.sin(out) * to_torch(weights).detach()).sum().backward()
  back = lambda a: np.moveaxis(a.detach().numpy(), 1, -1)
  return back(out), (back(tx.grad), ts.grad.numpy(), tb.grad.numpy())


# [B, H, W, C] and [B, N, C]; one channel per group; an offset much larger than the spread (where a
# one-pass E[x^2] - E[x]^2 variance loses digits).
@pytest.mark.parametrize("shape,groups,offset", [((2, 5, 7, 12), 4, 0.0), ((3, 6, 8), 8, 0.0), ((2, 3, 3, 4), 4, 0.0),
                                                  ((2, 8, 8, 16), 4, 300.0)])
def test_group_norm_matches_torch_with_gradients(shape, groups, offset):
  ks = jax.random.split(jax.random.key(0), 4)
  x = offset + 2 * jax.random.normal(ks[0], shape)
  c = shape[-1]
  module = GroupNorm(groups, 1e-5)
  params = {"params": {"scale": 1 + 0.3 * jax.random.normal(ks[1], (c,)), "bias": 0.5 * jax.random.normal(ks[2], (c,))}}
  assert jax.tree.map(jnp.shape, meta.unbox(module.init(ks[3], x))) == jax.tree.map(jnp.shape, params)
  weights = jax.random.normal(ks[3], shape)
  want, want_grads = _torch_group_norm(x, params["params"]["scale"], params["params"]["bias"], groups, 1e-5, weights)

  got = jax.jit(module.apply)(params, x)
  # Near an offset, float32 holds x itself only to its spacing there (3e-5 at 300).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 + 2 * float(np.spacing(np.float32(offset))))
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * weights), argnums=(0, 1)))(params, x)
  got_grads = (grads[1], grads[0]["params"]["scale"], grads[0]["params"]["bias"])
  for name, a, b in zip(("x", "scale", "bias"), got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_group_norm_bf16_statistics_in_float32():
  x = (100 + jax.random.normal(jax.random.key(0), (2, 4, 4, 8))).astype(jnp.bfloat16)
  module = GroupNorm(2, 1e-5, dtype=jnp.bfloat16)
  params = meta.unbox(module.init(jax.random.key(1), x))
  got = module.apply(params, x)
  want = nn.GroupNorm(2, epsilon=1e-5, use_fast_variance=False).apply(params, x.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  # Only the bf16 output's rounding (3 digits) remains; bf16 statistics of inputs near 100, held to
  # steps of 0.5, would be off by far more.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)
  dx = jax.grad(lambda x: jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2))(x)
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_group_norm_rejects_channels_that_do_not_split():
  with pytest.raises(ValueError, match="do not split into 4 groups"):
    GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


def test_gelu_matches_torch_with_gradient():
  import torch

  x = np.linspace(-8, 8, 801, dtype=np.float32)
  tx = torch.tensor(x, requires_grad=True)
  want = torch.nn.functional.gelu(tx)
  want.sum().backward()
  np.testing.assert_allclose(gelu(x), want.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(gelu(x)))(x), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
