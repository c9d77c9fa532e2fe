"""Shared building blocks: dense/conv layers with logical axis names, norms, ResNet blocks.

Every parameter carries logical axis names (see `diffusion_jax.parallel.LOGICAL_AXIS_RULES`), so one
table decides how it is sharded. Submodule names follow the diffusers/transformers state-dict names
(`conv1`, `time_emb_proj`, `to_out_0` ...) so that `diffusion_jax.convert` maps weights with a single
generic rule instead of a per-model table.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# A hardware choice's value in a run config, for `diffusion_jax.hardware.configure` to resolve.
AUTO = "auto"

# Logical axis names of parameters.
DENSE_AXES = ("embed", "mlp")  # kernel [in, out]
CONV_AXES = ("conv_h", "conv_w", "embed", "mlp")  # kernel [kh, kw, in, out]
BIAS_AXES = ("mlp",)
NORM_AXES = ("norm",)


def refuse_auto(owner: str, **choices) -> None:
  """Raises where a hardware choice (a config field that names how a layer runs) is still "auto"."""
  auto = [name for name, value in choices.items() if isinstance(value, str) and value == AUTO]
  if auto:
    raise ValueError(f"{owner}: {', '.join(auto)}='auto' must be chosen for the devices the program runs on "
                     "before the model runs: config = diffusion_jax.hardware.configure(config, devices, dtype)")


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


# torch.nn.Linear/Conv2d initialise with kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
def torch_default_init(key, shape, dtype=jnp.float32):
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def matmul_rows(x, kernel):  # [..., C] x [C, O] -> [..., O]
  """x @ kernel over the last axis, as one 2D matmul over the rows of x.

  With the leading axes merged, autodiff writes the kernel's gradient as a dot of two [rows, C] operands,
  which XLA's CPU matmul takes as they are. Over [B, T, C] operands XLA first transposes the output
  gradient, fused with (and recomputing) the elementwise work that produced it, in strided order,
  which is markedly slower (benchmarks/dense.py).
  """
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
  """A linear layer over the last axis with `nn.Dense`'s parameters (kernel [in, out], bias [out]), axis-named."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., C] -> [..., features]
    kernel, bias = _kernel_and_bias(self, (x.shape[-1], self.features), DENSE_AXES, self.use_bias)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = matmul_rows(x, kernel)
    return y if bias is None else y + bias


def _kernel_and_bias(module: nn.Module, shape: tuple[int, ...], axes: tuple[str, ...], use_bias: bool = True):
  """A kernel of `shape` initialised as torch does and a zero bias over its last axis (or None), both axis-named."""
  kernel = module.param("kernel", _partitioned(torch_default_init, axes), shape, module.param_dtype)
  if not use_bias:
    return kernel, None
  bias = module.param("bias", _partitioned(nn.initializers.zeros_init(), BIAS_AXES), (shape[-1],),
                      module.param_dtype)
  return kernel, bias


class SplitDense(nn.Module):
  """A Dense layer to `parts` * `features` outputs (one kernel, as in the reference), returned as `parts` arrays.

  Each part is its own matmul on a slice of the kernel, so the backward pass concatenates the small
  kernel gradients instead of the [B, T, parts * features] activation gradients.
  """
  features: int
  parts: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., C] -> parts x [..., features]
    kernel, bias = _kernel_and_bias(self, (x.shape[-1], self.parts * self.features), DENSE_AXES)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return tuple(matmul_rows(x, kernel[:, i * self.features:(i + 1) * self.features])
                 + bias[i * self.features:(i + 1) * self.features] for i in range(self.parts))


def Conv(features: int, kernel_size: int = 3, *, stride: int = 1, padding: Any = None,
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
  """NHWC `nn.Conv` with "same"-style symmetric padding by default, as torch's `padding=k//2`."""
  if padding is None:
    padding = ((kernel_size // 2, kernel_size // 2),) * 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=_partitioned(torch_default_init, CONV_AXES),
                 bias_init=_partitioned(nn.initializers.zeros_init(), BIAS_AXES), name=name)


def gelu(x):
  """Exact GELU, x Phi(x), in torch's form 0.5 x (1 + erf(x / sqrt(2))).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA's CPU code computes more slowly
  than erf.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


class GroupNorm(nn.Module):
  """GroupNorm over the last (channel) axis of [B, ..., C], statistics always in float32.

  Same parameters (`scale`, `bias`) and results as `nn.GroupNorm(use_fast_variance=False)` and
  torch's GroupNorm (two-pass variance; bf16 statistics drift visibly in the VAE), computed per
  (sample, channel) with a hand-written backward pass: every pass over the activation runs with
  channels innermost and reads [B, C] coefficients, instead of XLA re-deriving them per element over
  a [B, ..., groups, C/groups] view.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, ..., C] -> [B, ..., C]
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", _partitioned(nn.initializers.ones_init(), NORM_AXES), (channels,),
                       self.param_dtype)
    bias = self.param("bias", _partitioned(nn.initializers.zeros_init(), NORM_AXES), (channels,),
                      self.param_dtype)
    y = group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.num_groups, self.epsilon)
    return y.astype(self.dtype)


def _per_channel(v, channels):  # [B, G] -> [B, C]: each group's value repeated over its channels
  return jnp.repeat(v, channels // v.shape[1], axis=1)


def _group_sum(v, groups):  # [B, C] -> [B, G]
  return v.reshape(v.shape[0], groups, -1).sum(-1)


def _group_stats(x, groups: int, epsilon: float):  # x [B, N, C] float32 -> mean, 1/std [B, G]
  b, n, c = x.shape
  count = n * (c // groups)
  mean = _group_sum(jnp.sum(x, axis=1), groups) / count
  centred = x - _per_channel(mean, c)[:, None, :]
  var = _group_sum(jnp.sum(centred * centred, axis=1), groups) / count
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, groups: int, epsilon: float):
  """(x - mean) / sqrt(var + eps) * scale + bias per (sample, group) of [B, ..., C]; float32 result."""
  return _group_norm_fwd(x, scale, bias, groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon):
  b, c = x.shape[0], x.shape[-1]
  x3 = x.reshape(b, -1, c).astype(jnp.float32)  # [B, N, C]
  mean, rstd = _group_stats(x3, groups, epsilon)
  mean_c = _per_channel(mean, c)
  a = _per_channel(rstd, c) * scale  # y = (x - mean) a + bias, per (sample, channel)
  # Materialise the [B, C] coefficients: otherwise XLA recomputes them for every element of x.
  mean_c, a = jax.lax.optimization_barrier((mean_c, a))
  y = (x3 - mean_c[:, None, :]) * a[:, None, :] + bias
  return y.reshape(x.shape), (x, scale, mean, rstd)


def _group_norm_bwd(groups, epsilon, residuals, dy):
  del epsilon
  x, scale, mean, rstd = residuals
  b, c = x.shape[0], x.shape[-1]
  mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
  mean_c = jax.lax.optimization_barrier(mean_c)
  centred = x.reshape(b, -1, c).astype(jnp.float32) - mean_c[:, None, :]  # [B, N, C]
  dy3 = dy.reshape(b, -1, c).astype(jnp.float32)
  count = centred.shape[1] * (c // groups)
  sum_dy, sum_dy_centred = jnp.sum(dy3, axis=1), jnp.sum(dy3 * centred, axis=1)  # [B, C]
  d_bias = jnp.sum(sum_dy, axis=0)
  d_scale = jnp.sum(rstd_c * sum_dy_centred, axis=0)  # sum of dy * x_hat
  # dx = rstd (g - mean(g) - x_hat mean(g x_hat)) with g = scale dy and means over each group,
  # as dx = a dy + b (x - mean) + c with [B, C] coefficients.
  mean_g = _group_sum(scale * sum_dy, groups) / count  # [B, G]
  mean_g_xhat = rstd * _group_sum(scale * sum_dy_centred, groups) / count
  coef_dy = rstd_c * scale
  coef_centred = _per_channel(-rstd * rstd * mean_g_xhat, c)
  coef_1 = _per_channel(-rstd * mean_g, c)
  coef_dy, coef_centred, coef_1 = jax.lax.optimization_barrier((coef_dy, coef_centred, coef_1))
  dx = dy3 * coef_dy[:, None, :] + centred * coef_centred[:, None, :] + coef_1[:, None, :]
  return dx.reshape(x.shape).astype(x.dtype), d_scale, d_bias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def LayerNorm(epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=_partitioned(nn.initializers.ones_init(), NORM_AXES),
                      bias_init=_partitioned(nn.initializers.zeros_init(), NORM_AXES), name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] (DDPM / SD convention)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb):  # [B, D] -> [B, features]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = Dense(self.features, name="linear_1", **kw)(emb)
    return Dense(self.features, name="linear_2", **kw)(nn.silu(emb))


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, with an optional timestep shift and a 1x1 shortcut when widths differ."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, deterministic: bool = True):  # [B, H, W, C], [B, T] -> [B, H, W, out]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = Conv(self.out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      shift = Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + shift[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    h = Conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv. `asymmetric_pad` is the VAE encoder's (0, 1) padding."""
  channels: int
  asymmetric_pad: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H/2, W/2, C]
    padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
    return Conv(self.channels, 3, stride=2, padding=padding, name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _phase_kernels(kernel):  # [3, 3, C, O] -> [2, 2, C, 4, O]: the 2x2 kernel of each output phase 2a+b
  def phase_taps(k, axis):  # 3 taps along `axis` -> [phase 0 (reads i-1, i), phase 1 (reads i, i+1)], 2 taps each
    k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return jnp.stack([k0, k1 + k2], axis=axis), jnp.stack([k0 + k1, k2], axis=axis)

  return jnp.stack([col for row in phase_taps(kernel, 0) for col in phase_taps(row, 1)], axis=3)


class UpsampleConv(nn.Module):
  """Nearest-neighbour x2 upsampling, then a 3x3 "same" conv, without building the upsampled tensor.

  Output pixel (2i+a, 2j+b) sees only a 2x2 window of the input: the 3x3 kernel taps that land on the
  same input pixel add up. So the layer is a 2x2 convolution of the input per output phase (a, b):
  4/9 of the multiply-adds of the 3x3 conv on the upsampled tensor, with the same parameters
  (a [3, 3, in, out] kernel, as `Conv`) and the same result up to float rounding.
  """
  features: int
  # The four phases as one 2x2 convolution (with a one-pixel border of unused outputs) where the input is
  # at least this many pixels high and wide, else as one matmul per phase; 0: always the matmuls.
  conv_min_side: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, 2H, 2W, features]
    refuse_auto("UpsampleConv", upsample_conv_min_side=self.conv_min_side)
    b, h, w, c = x.shape
    kernel, bias = _kernel_and_bias(self, (3, 3, c, self.features), CONV_AXES)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    kernels = _phase_kernels(kernel)  # [2, 2, C, 4, out]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H+2, W+2, C]
    if self.conv_min_side > 0 and min(h, w) >= self.conv_min_side:
      # All four phases as one 2x2 convolution with 4 * out features; phase (a, b) is its output
      # shifted by (a, b).
      every = jax.lax.conv_general_dilated(padded, kernels.reshape(2, 2, c, 4 * self.features), (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
      every = every.reshape(b, h + 1, w + 1, 4, self.features)  # [B, H+1, W+1, phase, out]
      phases = [every[:, a:a + h, col:col + w, 2 * a + col] for a in (0, 1) for col in (0, 1)]
    else:
      # Each phase as one matmul over its four shifted inputs.
      phases = []
      for a in (0, 1):
        for col in (0, 1):
          taps = [padded[:, a + dy:a + dy + h, col + dx:col + dx + w] for dy in (0, 1) for dx in (0, 1)]
          patches = jnp.concatenate(taps, axis=-1)  # [B, H, W, 4C]
          phase_kernel = kernels[:, :, :, 2 * a + col].reshape(4 * c, self.features)
          phases.append(jnp.einsum("bhwk,ko->bhwo", patches, phase_kernel))
    y = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, self.features)  # [B, H, W, a, b, out]
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.features) + bias


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv (computed as `UpsampleConv`)."""
  channels: int
  conv_min_side: int = 0  # UpsampleConv's
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, 2H, 2W, C]
    return UpsampleConv(self.channels, self.conv_min_side, name="conv", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
