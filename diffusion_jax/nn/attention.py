"""Attention, GEGLU feed-forward, the transformer block and the spatial transformer of the UNet."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn.layers import Conv, Dense, Dtype, GroupNorm, LayerNorm


def multi_head_attention(q, k, v, heads: int, *, mask=None, is_causal: bool = False):
  """Scaled dot-product attention on [B, T, heads*Dh] projections, through `jax.nn.dot_product_attention`."""
  b, tq, inner = q.shape
  tk = k.shape[1]
  dh = inner // heads
  # [B, T, C] -> [B, T, N, Dh]: the layout jax.nn.dot_product_attention (and cuDNN flash attention) expects.
  q = q.reshape(b, tq, heads, dh)
  k = k.reshape(b, tk, heads, dh)
  v = v.reshape(b, tk, heads, dh)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  return out.reshape(b, tq, inner)  # [B, T, C]


class Attention(nn.Module):
  """Multi-head (cross-)attention with to_q/to_k/to_v/to_out_0 projections (dropout after to_out_0)."""
  heads: int
  dim_head: int
  qkv_bias: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, deterministic: bool = True):  # [B, T, C], [B, L, D] -> [B, T, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    context = x if context is None else context
    q = Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
    k = Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context)
    v = Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context)
    out = multi_head_attention(q, k, v, self.heads)
    out = Dense(x.shape[-1], name="to_out_0", **kw)(out)
    return nn.Dropout(self.dropout, deterministic=deterministic)(out)


class GEGLU(nn.Module):
  """Gated GELU (Shazeer 2020): one projection to 2*inner, value * gelu(gate)."""
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, C] -> [B, T, inner]
    h = Dense(2 * self.inner_dim, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward, 4x wide; submodule names match the reference `ff.net.{0,2}` (net.1 is dropout)."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):  # [B, T, C] -> [B, T, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    return Dense(x.shape[-1], name="net_2", **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward; residual after each."""
  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):  # [B, T, C], [B, L, D] -> [B, T, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, dim_head=self.dim_head, dropout=self.dropout, **kw)
    x = x + Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x), None, deterministic)
    x = x + Attention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context, deterministic)
    ff = FeedForward(dropout=self.dropout, name="ff", **kw)
    return x + ff(LayerNorm(name="norm3", **kw)(x), deterministic)


class SpatialTransformer(nn.Module):
  """GroupNorm, project in (1x1 conv or linear), transformer blocks over H*W tokens, project out, residual."""
  heads: int
  dim_head: int
  depth: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):  # [B, H, W, C], [B, L, D] -> [B, H, W, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    x = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      x = Dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))  # [B, HW, inner]
    else:
      x = Conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)  # [B, HW, inner]
    # `deterministic` (argument 3, counting self) is a Python bool: static under remat.
    block_cls = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
    for i in range(self.depth):
      block = block_cls(self.heads, self.dim_head, self.dropout, name=f"transformer_blocks_{i}", **kw)
      x = block(x, context, deterministic)
    if self.use_linear_projection:
      x = Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
    else:
      x = Conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
    return x + residual
