"""The text-conditioned UNet of Stable Diffusion 1.x/2.x (diffusers' UNet2DConditionModel), NHWC.

Submodules are named after the diffusers state dict (`down_blocks_0/resnets_1/conv1`, `mid_block/attentions_0`,
`up_blocks_2/upsamplers_0/conv` ...) so `diffusion_jax.convert.keys.torch_to_flax` loads diffusers weights
with no per-model table. `UNetConfig.from_diffusers` / `to_diffusers` read and write diffusers' `config.json`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn.attention import IMPLEMENTATIONS, SpatialTransformer
from diffusion_jax.nn.layers import (AUTO, Conv, Downsample, Dtype, GroupNorm, ResnetBlock, TimestepEmbedding,
                                     Upsample, refuse_auto, timestep_embedding)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
REMAT_MODES = ("none", "transformer", "resnet_and_transformer")
# jax.checkpoint_policies that take no arguments; with one of these, resnets and transformers are rematerialised.
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
ACTIVATION_AXES = ("batch", "height", "width", "channels")
# Our own fields, not diffusers': how the model runs, not what it computes.
_CHOICE_FIELDS = ("attention", "ff_chunk_elements", "upsample_conv_min_side")
_OWN_FIELDS = ("remat",) + _CHOICE_FIELDS

# diffusers options we do not implement, with the only value we accept (their default).
_FIXED_DIFFUSERS_OPTIONS: dict[str, Any] = {
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Read by diffusers only together with an option above that we reject: accepted and ignored.
_INERT_DIFFUSERS_OPTIONS: dict[str, Any] = {"addition_embed_type_num_heads": 64}


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _per_block(value, n: int, name: str) -> tuple:
  """An int (or bool) for every block, or a per-block sequence checked for length."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNetConfig.{name} has {len(value)} entries for {n} blocks: {value}")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the UNet; field names and meanings follow diffusers' UNet2DConditionModel config."""
  sample_size: int | tuple[int, int] | None = 64  # latent size the model was trained at (metadata only)
  in_channels: int = 4  # latent channels in
  out_channels: int = 4  # channels predicted
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
  layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks have one more)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or None: no middle block
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  # diffusers' legacy name: the NUMBER OF HEADS (int or per block) unless num_attention_heads is given.
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None  # heads per block; overrides attention_head_dim
  cross_attention_dim: int | tuple[int, ...] = 768  # width of the text context (int or per block)
  use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2) instead of 1x1 conv (SD 1)
  transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per SpatialTransformer
  norm_num_groups: int = 32  # GroupNorm groups everywhere
  norm_eps: float = 1e-5  # GroupNorm eps of resnets and of the output norm
  flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin]
  freq_shift: int = 0  # downscale_freq_shift of the timestep embedding
  only_cross_attention: bool | tuple[bool, ...] = False  # only False is implemented
  center_input_sample: bool = False  # map the input x -> 2x - 1 first
  upcast_attention: bool = False  # accepted: softmax is always computed in float32 here
  dropout: float = 0.0  # dropout in resnets and transformer blocks (training only)
  conv_in_kernel: int = 3  # kernel of conv_in
  conv_out_kernel: int = 3  # kernel of conv_out
  time_embedding_dim: int | None = None  # width of the timestep MLP; None: 4 * block_out_channels[0]
  # Rematerialisation (trades compute for memory in training): "none", "transformer",
  # "resnet_and_transformer", or a jax.checkpoint_policies name (applied to resnets and transformers).
  remat: str = "none"
  # How it runs on the devices at hand, chosen by the caller (`diffusion_jax.hardware.configure`
  # resolves a run config's "auto"; the model refuses "auto"). Attention: one of
  # `attention.IMPLEMENTATIONS` ("xla", "cudnn", "cpu_kernel", "cpu_tiles").
  attention: str = "xla"
  # The transformers' feed-forward over chunks of rows whose activations hold about this many
  # elements (0: in one piece).
  ff_chunk_elements: int | str = 0
  # Upsamplers as one 2x2 convolution on inputs at least this many pixels high and wide, else one
  # matmul per output phase (0: always the matmuls).
  upsample_conv_min_side: int | str = 0

  def __post_init__(self):
    for name in ("sample_size", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                 "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                 "transformer_layers_per_block", "only_cross_attention"):
      object.__setattr__(self, name, _tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNetConfig needs one down and one up block type per entry of block_out_channels ({n}): "
                       f"got {self.down_block_types} and {self.up_block_types}")
    for kind, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
      for t in getattr(self, kind):
        if t not in allowed:
          raise ValueError(f"UNetConfig.{kind}: {t!r} is not supported (supported: {allowed})")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"UNetConfig.mid_block_type {self.mid_block_type!r} is not supported "
                       f"(supported: {MID_BLOCK_TYPES})")
    if any(_per_block(self.only_cross_attention, n, "only_cross_attention")):
      raise ValueError("UNetConfig.only_cross_attention=True is not supported")
    for t in _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block"):
      if not isinstance(t, int):
        raise ValueError("UNetConfig.transformer_layers_per_block must be an int or one int per block, "
                         f"got {self.transformer_layers_per_block}")
    if not isinstance(self.norm_num_groups, int):
      raise ValueError(f"UNetConfig.norm_num_groups must be an int, got {self.norm_num_groups!r}")
    for width, heads in zip(self.block_out_channels, self.heads_per_block):
      if width % heads or width % self.norm_num_groups:
        raise ValueError(f"block width {width} must be divisible by its {heads} heads and by norm_num_groups "
                         f"{self.norm_num_groups}")
    _per_block(self.layers_per_block, n, "layers_per_block")
    if len(set(_per_block(self.cross_attention_dim, n, "cross_attention_dim"))) != 1:
      raise ValueError("UNetConfig.cross_attention_dim must be the same for every block (one text context), "
                       f"got {self.cross_attention_dim}")
    if self.remat not in REMAT_MODES + REMAT_POLICIES:
      raise ValueError(f"UNetConfig.remat {self.remat!r}: use one of {REMAT_MODES + REMAT_POLICIES}")
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ValueError("conv_in_kernel and conv_out_kernel must be odd")
    if self.attention not in IMPLEMENTATIONS + (AUTO,):
      raise ValueError(f"UNetConfig.attention {self.attention!r}: use one of {IMPLEMENTATIONS + (AUTO,)}")
    for name in ("ff_chunk_elements", "upsample_conv_min_side"):
      value = getattr(self, name)
      if value != AUTO and not (isinstance(value, int) and value >= 0):
        raise ValueError(f"UNetConfig.{name} must be an int >= 0 or 'auto', got {value!r}")

  # Per-block values, in down-block order.
  @property
  def heads_per_block(self) -> tuple[int, ...]:
    heads = self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads
    return _per_block(heads, len(self.block_out_channels), "attention_head_dim")

  @property
  def layers_per_block_list(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

  @property
  def transformer_depths(self) -> tuple[int, ...]:
    return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                      "transformer_layers_per_block")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "UNetConfig":
    """Builds the config from diffusers' `unet/config.json` (as a dict); `overrides` set our own fields
    (remat, attention, ff_chunk_elements, upsample_conv_min_side)."""
    kwargs = {}
    own = {f.name for f in dataclasses.fields(cls)}
    for key, value in config.items():
      if key.startswith("_") or key in _INERT_DIFFUSERS_OPTIONS:
        continue
      if key in _FIXED_DIFFUSERS_OPTIONS:
        if value != _FIXED_DIFFUSERS_OPTIONS[key]:
          raise ValueError(f"UNet option {key}={value!r} is not supported "
                           f"(only {key}={_FIXED_DIFFUSERS_OPTIONS[key]!r} is implemented)")
      elif key == "mid_block_only_cross_attention":
        if value:
          raise ValueError("UNet option mid_block_only_cross_attention=True is not supported")
      elif key in own and key not in _OWN_FIELDS:
        kwargs[key] = value
      else:
        raise ValueError(f"unknown UNet2DConditionModel option {key!r}={value!r}")
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """The matching diffusers `config.json` dict (UNet2DConditionModel.from_config accepts it)."""
    def as_json(v):
      return list(v) if isinstance(v, tuple) else v
    # diffusers rejects num_attention_heads and reads the head count from attention_head_dim.
    heads = self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads
    out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(self):
      if f.name not in _OWN_FIELDS:
        out[f.name] = as_json(getattr(self, f.name))
    out.update(attention_head_dim=as_json(heads), num_attention_heads=None, mid_block_only_cross_attention=None)
    out.update(_FIXED_DIFFUSERS_OPTIONS)
    out.update(_INERT_DIFFUSERS_OPTIONS)
    return out


SD15 = UNetConfig()  # runwayml/stable-diffusion-v1-5: 859,520,964 parameters
SD21 = UNetConfig(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                  use_linear_projection=True, upcast_attention=True)  # stabilityai/stable-diffusion-2-1
TINY = UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8)


@functools.lru_cache(maxsize=None)
def _block_classes(remat: str):
  """(resnet class, transformer class), wrapped in nn.remat as `remat` asks."""
  if remat == "none":
    return ResnetBlock, SpatialTransformer
  policy = getattr(jax.checkpoint_policies, remat) if remat in REMAT_POLICIES else None
  # Argument 3 (counting self) is `deterministic`, a Python bool: static under remat.
  transformer = nn.remat(SpatialTransformer, policy=policy, static_argnums=(3,))
  resnet = ResnetBlock if remat == "transformer" else nn.remat(ResnetBlock, policy=policy, static_argnums=(3,))
  return resnet, transformer


def _constrain(x):
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


class _UNetBlock(nn.Module):
  """Shared fields of the down, middle and up blocks; `heads == 0` means no attention."""
  config: UNetConfig
  out_channels: int
  num_layers: int
  heads: int = 0
  transformer_depth: int = 1
  resample: bool = False  # add the downsampler / upsampler
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, name):
    cfg = self.config
    cls = _block_classes(cfg.remat)[0]
    return cls(self.out_channels, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout, name=name,
               dtype=self.dtype, param_dtype=self.param_dtype)

  def transformer(self, name):
    cfg = self.config
    cls = _block_classes(cfg.remat)[1]
    return cls(self.heads, self.out_channels // self.heads, depth=self.transformer_depth,
               use_linear_projection=cfg.use_linear_projection, groups=cfg.norm_num_groups, dropout=cfg.dropout,
               attention=cfg.attention, ff_chunk_elements=cfg.ff_chunk_elements, name=name, dtype=self.dtype,
               param_dtype=self.param_dtype)


class DownBlock(_UNetBlock):
  """CrossAttnDownBlock2D (heads > 0) or DownBlock2D: resnets [+ transformers], then a stride-2 conv."""

  @nn.compact
  def __call__(self, x, temb, context, deterministic: bool):  # [B, H, W, Cin] -> [B, H/2, W/2, C], skips
    skips = []
    for i in range(self.num_layers):
      x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
      if self.heads:
        x = self.transformer(f"attentions_{i}")(x, context, deterministic)
      skips.append(x)
    if self.resample:
      x = Downsample(self.out_channels, name="downsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
      skips.append(x)
    return _constrain(x), skips


class MidBlock(_UNetBlock):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer."""

  @nn.compact
  def __call__(self, x, temb, context, deterministic: bool):  # [B, H, W, C] -> [B, H, W, C]
    x = self.resnet("resnets_0")(x, temb, deterministic)
    for i in range(self.num_layers):
      x = self.transformer(f"attentions_{i}")(x, context, deterministic)
      x = self.resnet(f"resnets_{i + 1}")(x, temb, deterministic)
    return _constrain(x)


class UpBlock(_UNetBlock):
  """CrossAttnUpBlock2D (heads > 0) or UpBlock2D: concatenate a skip, resnet [+ transformer]; then upsample."""

  @nn.compact
  def __call__(self, x, skips, temb, context, deterministic: bool):  # [B, H, W, C'] -> [B, 2H, 2W, C]
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)  # [B, H, W, C' + C_skip]
      x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
      if self.heads:
        x = self.transformer(f"attentions_{i}")(x, context, deterministic)
    if self.resample:
      x = Upsample(self.out_channels, self.config.upsample_conv_min_side, name="upsamplers_0", dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
    return _constrain(x)


class UNet(nn.Module):
  """UNet2DConditionModel: predicts noise (or v) from noisy latents, timesteps and text context."""
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample, timesteps, context, deterministic: bool = True):
    """[B, h, w, C_in], [B] or scalar (int or float), [B, L, D] -> [B, h, w, C_out] in `sample`'s dtype."""
    cfg = self.config
    refuse_auto("UNet", **{name: getattr(cfg, name) for name in _CHOICE_FIELDS})
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(cfg.block_out_channels)
    b, h, w, _ = sample.shape
    factor = 2 ** (n - 1)
    if h % factor or w % factor:
      raise ValueError(f"UNet input {h}x{w} must be divisible by {factor} (one factor 2 per downsampler)")
    heads = [hd if t.startswith("CrossAttn") else 0 for hd, t in zip(cfg.heads_per_block, cfg.down_block_types)]
    depths, layers = cfg.transformer_depths, cfg.layers_per_block_list

    timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               downscale_freq_shift=cfg.freq_shift)  # [B, C0]
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb)  # [B, T]

    x = 2 * sample - 1.0 if cfg.center_input_sample else sample
    x = _constrain(Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x))
    skips = [x]
    for i, width in enumerate(cfg.block_out_channels):
      x, block_skips = DownBlock(cfg, width, layers[i], heads[i], depths[i], resample=i < n - 1,
                                 name=f"down_blocks_{i}", **kw)(x, temb, context, deterministic)
      skips += block_skips

    if cfg.mid_block_type is not None:
      x = MidBlock(cfg, cfg.block_out_channels[-1], 1, cfg.heads_per_block[-1], depths[-1], name="mid_block",
                   **kw)(x, temb, context, deterministic)

    for i, width in enumerate(reversed(cfg.block_out_channels)):
      j = n - 1 - i  # the matching down block
      num = layers[j] + 1
      block_skips, skips = skips[-num:], skips[:-num]
      up_heads = cfg.heads_per_block[j] if cfg.up_block_types[i].startswith("CrossAttn") else 0
      x = UpBlock(cfg, width, num, up_heads, depths[j], resample=i < n - 1, name=f"up_blocks_{i}",
                  **kw)(x, block_skips, temb, context, deterministic)

    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
    x = Conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
    return x.astype(sample.dtype)
