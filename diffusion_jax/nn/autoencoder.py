"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), Stable Diffusion's VAE.

Images [B, H, W, 3] in [-1, 1] are encoded to a diagonal Gaussian over latents [B, H/f, W/f, C]
(f = 2 ** (len(block_out_channels) - 1)) and latents are decoded back to images. Submodules are named
after diffusers' `AutoencoderKL` state dict, so `diffusion_jax.convert.keys.torch_to_flax` loads its
weights with no per-model table.

The diffusion model works on *scaled* latents: `scale_latents(z, config)` before the UNet and
`unscale_latents(z, config)` before `decode`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn.attention import IMPLEMENTATIONS, multi_head_attention
from diffusion_jax.nn.layers import AUTO, Conv, Dense, Downsample, Dtype, GroupNorm, ResnetBlock, Upsample

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Every norm of the VAE uses this epsilon (diffusers hard-codes it in Encoder/Decoder).
NORM_EPS = 1e-6

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_ACTIVATIONS = ("silu", "swish")
# Our own fields, not diffusers': how the model runs, not what it computes.
_OWN_FIELDS = ("remat", "attention", "upsample_conv_min_side")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of an `AutoencoderKL`; field names and defaults follow diffusers' config.json."""
  in_channels: int = 3  # image channels read by the encoder
  out_channels: int = 3  # image channels written by the decoder
  latent_channels: int = 4  # channels of the latent (the encoder writes 2x: mean and log-variance)
  block_out_channels: tuple[int, ...] = (64,)  # widths of the encoder levels (the decoder mirrors them)
  layers_per_block: int = 1  # resnets per encoder level; decoder levels hold one more
  norm_num_groups: int = 32  # GroupNorm groups everywhere
  sample_size: int | tuple[int, int] = 32  # nominal image size (metadata; any multiple of the factor works)
  scaling_factor: float = 0.18215  # latents * scaling_factor have about unit variance for the diffusion model
  shift_factor: float | None = None  # subtracted before scaling (SD3/Flux VAEs); None for SD
  latents_mean: tuple[float, ...] | None = None  # per-channel statistics used by some pipelines instead of
  latents_std: tuple[float, ...] | None = None  #   shift_factor (SDXL-style); None for SD
  force_upcast: bool = True  # the reference runs this VAE in float32 at high resolution (metadata)
  use_quant_conv: bool = True  # 1x1 conv on the encoder moments
  use_post_quant_conv: bool = True  # 1x1 conv on the latents before the decoder
  mid_block_add_attention: bool = True  # self-attention between the two mid-block resnets
  remat: bool = False  # rematerialise resnet activations in the backward pass (training memory)
  # How the mid-block attention and the upsamplers run on the devices at hand, chosen by the caller
  # (`diffusion_jax.hardware.configure` resolves "auto"): see `attention.IMPLEMENTATIONS` and
  # `layers.UpsampleConv.conv_min_side`.
  attention: str = "xla"
  upsample_conv_min_side: int | str = 0

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    if isinstance(self.sample_size, (list, tuple)):
      object.__setattr__(self, "sample_size", tuple(self.sample_size))
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(float(v) for v in value))
    if not self.block_out_channels:
      raise ValueError("AutoencoderConfig: block_out_channels must name at least one level")
    if self.attention not in IMPLEMENTATIONS + (AUTO,):
      raise ValueError(f"AutoencoderConfig.attention {self.attention!r}: use one of {IMPLEMENTATIONS + (AUTO,)}")
    if self.upsample_conv_min_side != AUTO and not (isinstance(self.upsample_conv_min_side, int)
                                                    and self.upsample_conv_min_side >= 0):
      raise ValueError("AutoencoderConfig.upsample_conv_min_side must be an int >= 0 or 'auto', "
                       f"got {self.upsample_conv_min_side!r}")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"AutoencoderConfig: block_out_channels {bad} are not divisible by "
                       f"norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "AutoencoderConfig":
    """Reads diffusers' `AutoencoderKL` config.json (a dict); raises ValueError for options this module lacks.
    `overrides` set our own fields (remat, attention, upsample_conv_min_side)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version ...
    levels = len(config.get("block_out_channels", cls.block_out_channels))
    down = tuple(config.pop("down_block_types", (_DOWN_BLOCK,)))
    up = tuple(config.pop("up_block_types", (_UP_BLOCK,)))
    act = config.pop("act_fn", "silu")
    if down != (_DOWN_BLOCK,) * levels:
      raise ValueError(f"AutoencoderKL: down_block_types must be {levels} x {_DOWN_BLOCK!r}, got {down}")
    if up != (_UP_BLOCK,) * levels:
      raise ValueError(f"AutoencoderKL: up_block_types must be {levels} x {_UP_BLOCK!r}, got {up}")
    if act not in _ACTIVATIONS:
      raise ValueError(f"AutoencoderKL: act_fn {act!r} is not supported (only 'silu')")
    known = {f.name for f in dataclasses.fields(cls)} - set(_OWN_FIELDS)
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"AutoencoderKL: unsupported config options {unknown}")
    return cls(**config, **overrides)

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' `AutoencoderKL` config.json (a dict) for this architecture."""
    out = {"_class_name": "AutoencoderKL"}
    for f in dataclasses.fields(self):
      if f.name in _OWN_FIELDS:
        continue
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    levels = len(self.block_out_channels)
    out.update(down_block_types=[_DOWN_BLOCK] * levels, up_block_types=[_UP_BLOCK] * levels, act_fn="silu")
    return out


# Stable Diffusion 1.x / 2.x (the same VAE; 2.x ships it with sample_size 768): 83,653,863 parameters.
SD = AutoencoderConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
# A CPU-sized VAE for 64x64 images: 16x16x4 latents. Its scaling factor is set after training
# (see `estimate_scaling_factor`).
TINY = AutoencoderConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                         sample_size=64, scaling_factor=1.0)


class MidBlockAttention(nn.Module):
  """Single-head self-attention over all H*W positions, with its own GroupNorm and a residual."""
  groups: int
  attention: str = "xla"  # one of attention.IMPLEMENTATIONS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, NORM_EPS, name="group_norm", **kw)(x)
    y = y.reshape(b, h * w, c)  # [B, HW, C]
    q = Dense(c, name="to_q", **kw)(y)
    k = Dense(c, name="to_k", **kw)(y)
    v = Dense(c, name="to_v", **kw)(y)
    # One head of width C (512 in SD) is too wide for fused kernels, so XLA holds the [B, 1, HW, HW]
    # float32 scores: 64 MiB per image for SD at 512x512 (4096 positions), small beside the convs.
    out = Dense(c, name="to_out_0", **kw)(multi_head_attention(q, k, v, heads=1, implementation=self.attention))
    return x + out.reshape(b, h, w, c)


# Recomputes a resnet's activations in the backward pass instead of storing them.
RematResnetBlock = nn.remat(ResnetBlock)


def _resnet_cls(remat: bool):
  return RematResnetBlock if remat else ResnetBlock


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, h, w, C] -> [B, h, w, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg, c = self.config, x.shape[-1]
    resnet = _resnet_cls(cfg.remat)
    x = resnet(c, cfg.norm_num_groups, NORM_EPS, name="resnets_0", **kw)(x)
    if cfg.mid_block_add_attention:
      x = MidBlockAttention(cfg.norm_num_groups, cfg.attention, name="attentions_0", **kw)(x)
    return resnet(c, cfg.norm_num_groups, NORM_EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock(nn.Module):
  """`layers` resnets, then (except at the last level) a stride-2 conv padded (0, 1) as the reference."""
  channels: int
  layers: int
  add_downsample: bool
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C_in] -> [B, H/2, W/2, channels] (or [B, H, W, channels])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = _resnet_cls(self.config.remat)
    for j in range(self.layers):
      x = resnet(self.channels, self.config.norm_num_groups, NORM_EPS, name=f"resnets_{j}", **kw)(x)
    if self.add_downsample:
      x = Downsample(self.channels, asymmetric_pad=True, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock(nn.Module):
  """`layers` resnets, then (except at the last level) nearest x2 upsampling and a 3x3 conv."""
  channels: int
  layers: int
  add_upsample: bool
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, h, w, C_in] -> [B, 2h, 2w, channels] (or [B, h, w, channels])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet = _resnet_cls(self.config.remat)
    for j in range(self.layers):
      x = resnet(self.channels, self.config.norm_num_groups, NORM_EPS, name=f"resnets_{j}", **kw)(x)
    if self.add_upsample:
      x = Upsample(self.channels, self.config.upsample_conv_min_side, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out to the Gaussian's moments."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, in] -> [B, H/f, W/f, 2*latent]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    x = Conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock(channels, cfg.layers_per_block, i != last, cfg, name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(cfg, name="mid_block", **kw)(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x))
    return Conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """conv_in, mid block, up blocks (widths reversed, one more resnet each), GroupNorm-SiLU-conv_out."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):  # [B, h, w, latent] -> [B, h*f, w*f, out]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    widths = cfg.block_out_channels[::-1]
    x = Conv(widths[0], 3, name="conv_in", **kw)(z)
    x = MidBlock(cfg, name="mid_block", **kw)(x)
    last = len(widths) - 1
    for i, channels in enumerate(widths):
      x = UpDecoderBlock(channels, cfg.layers_per_block + 1, i != last, cfg, name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out", **kw)(x))
    return Conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """Stable Diffusion's VAE. Methods for `apply(..., method=...)`: `encode`, `decode`, `__call__`.

  Outputs (moments and images) are float32 whatever the compute dtype: the log-variance is
  exponentiated and the pixels feed losses, both of which bfloat16 would coarsen.
  """
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = Conv(2 * cfg.latent_channels, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv(cfg.latent_channels, 1, **kw) if cfg.use_post_quant_conv else None

  def encode(self, images):  # [B, H, W, in] in [-1, 1] -> ([B, h, w, latent], [B, h, w, latent])
    """Images -> (mean, logvar) of the diagonal Gaussian posterior; logvar clipped to [-30, 20]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents):  # [B, h, w, latent] (unscaled) -> [B, H, W, out]
    """Unscaled latents (see `unscale_latents`) -> images, about [-1, 1]."""
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents).astype(jnp.float32)

  def __call__(self, images, key: jax.Array | None = None, sample_posterior: bool = True):
    """Training pass: images -> (reconstruction, mean, logvar).

    With `sample_posterior` the decoder sees a posterior sample drawn with `key` (required);
    otherwise it sees the mean.
    """
    mean, logvar = self.encode(images)
    if sample_posterior and not self.is_initializing():
      if key is None:
        raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key (or pass sample_posterior=False)")
      latents = sample_latent(mean, logvar, key)
    else:
      latents = mean
    return self.decode(latents), mean, logvar


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """One draw from the posterior N(mean, exp(logvar)) by reparameterisation (differentiable in both)."""
  noise = jax.random.normal(key, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over each example: [B, ...] -> [B].

  Equals diffusers' `DiagonalGaussianDistribution.kl()` (which sums, it does not average).
  """
  logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
  per_element = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(per_element, axis=tuple(range(1, mean.ndim)))


def _channel_stats(config: AutoencoderConfig, dtype) -> tuple[Any, Any]:
  """(shift, scale) with z_scaled = (z - shift) * scale, from the config's normalisation fields."""
  if config.latents_mean is not None and config.latents_std is not None:
    mean = jnp.asarray(config.latents_mean, dtype)
    std = jnp.asarray(config.latents_std, dtype)
    return mean, config.scaling_factor / std
  return (config.shift_factor or 0.0), config.scaling_factor


def scale_latents(latents: jax.Array, config: AutoencoderConfig) -> jax.Array:
  """VAE latents -> the diffusion model's latents: `(z - shift) * scaling_factor` (SD: `z * 0.18215`).

  With per-channel `latents_mean`/`latents_std` in the config: `(z - mean) * scaling_factor / std`.
  """
  shift, scale = _channel_stats(config, latents.dtype)
  return (latents - shift) * scale


def unscale_latents(latents: jax.Array, config: AutoencoderConfig) -> jax.Array:
  """Inverse of `scale_latents`: the diffusion model's latents -> what `decode` takes."""
  shift, scale = _channel_stats(config, latents.dtype)
  return latents / scale + shift


def estimate_scaling_factor(latents: jax.Array) -> float:
  """1 / std of encoder latents (the recipe behind SD's 0.18215), for a newly trained VAE."""
  return float(1.0 / jnp.std(latents.astype(jnp.float32)))
