"""Attention, GEGLU feed-forward, the transformer block and the spatial transformer of the UNet."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nn import cpu_attention
from diffusion_jax.nn.layers import Conv, Dense, Dtype, GroupNorm, LayerNorm, SplitDense, gelu, refuse_auto
from diffusion_jax.util import warn_once


# Score tiles of this many float32 elements (4 MiB) stay in the CPU's caches, where one [B, N, T, S]
# softmax would go out to memory (benchmarks/attention.py).
CPU_TILE_ELEMENTS = 1 << 20

# Fewer rows per feed-forward chunk than this and the loop costs more than the caches save (SD 1.5's
# sizes then run in one piece).
_MIN_FF_CHUNK_ROWS = 256

# How unmasked, non-causal attention runs (the models' `attention` field; masked or causal attention
# is always XLA's):
#   "xla": jax.nn.dot_product_attention;
#   "cudnn": cuDNN's fused (flash) attention for 16-bit inputs, which never holds the [B, N, T, S]
#     scores in memory; XLA's where the dtype, head size or GPU has none;
#   "cpu_kernel": the fused CPU kernel of `cpu_attention` for float32; the tiles for other dtypes, or
#     (with one warning) where the kernel does not build; its custom call has no sharding rule, so
#     programs on several devices use "cpu_tiles";
#   "cpu_tiles": `tiled_attention`, cache-sized score tiles.
# A run config's "auto" is resolved by `diffusion_jax.hardware.configure` before a model is built.
IMPLEMENTATIONS = ("xla", "cudnn", "cpu_kernel", "cpu_tiles")
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_FUSED_MAX_HEAD_DIM = 256  # cuDNN's limit on Hopper (128 before); the VAE's single 512-wide head is above it


def check_implementation(owner: str, implementation: str) -> None:
  """Raises for a run config's "auto" (not resolved yet) or a name that is not in IMPLEMENTATIONS."""
  refuse_auto(owner, attention=implementation)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{owner}: attention={implementation!r}: use one of {IMPLEMENTATIONS} "
                     "(or 'auto' in a config, for diffusion_jax.hardware.configure to choose)")


def multi_head_attention(q, k, v, heads: int, *, mask=None, is_causal: bool = False, implementation: str = "xla"):
  """Scaled dot-product attention on [B, T, heads*Dh] projections, unmasked non-causal attention as
  `implementation` says (see IMPLEMENTATIONS); masked or causal attention through XLA's
  `jax.nn.dot_product_attention`."""
  check_implementation("multi_head_attention", implementation)
  b, tq, inner = q.shape
  tk = k.shape[1]
  dh = inner // heads
  # [B, T, C] -> [B, T, N, Dh]: the layout jax.nn.dot_product_attention (and cuDNN flash attention) expects.
  q = q.reshape(b, tq, heads, dh)
  k = k.reshape(b, tk, heads, dh)
  v = v.reshape(b, tk, heads, dh)
  out = None
  if mask is None and not is_causal:
    if implementation == "cpu_kernel" and all(x.dtype == jnp.float32 for x in (q, k, v)) and cpu_attention.available():
      out = cpu_attention.attention(q, k, v)
    elif implementation in ("cpu_kernel", "cpu_tiles"):
      out = tiled_attention(q, k, v)
    elif implementation == "cudnn" and q.dtype in _FUSED_DTYPES and dh <= _FUSED_MAX_HEAD_DIM and dh % 8 == 0:
      out = fused_attention(q, k, v, "cudnn")
  if out is None:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  return out.reshape(b, tq, inner)  # [B, T, C]


def fused_attention(q, k, v, implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention` with a fused `implementation`, or None where it has none.

  JAX checks the library, the GPU and the shapes (cuDNN: head dim a multiple of 8, at most 128, or 256
  on Hopper) while tracing and raises if one is not supported; the caller then falls back to XLA's.
  """
  try:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  except (NotImplementedError, ValueError):  # a GPU or shape the kernel lacks (e.g. head dim > 128 before Hopper)
    return None
  except RuntimeError as error:  # no cuDNN, or one too old: worth saying once
    warn_once(f"fused attention ({implementation}) is not available: {error}; using XLA's attention")
    return None


def tiled_attention(q, k, v, tile_elements: int = CPU_TILE_ELEMENTS):
  """softmax(q k^T / sqrt(Dh)) v over [B, T, N, Dh] / [B, S, N, Dh], one cache-sized tile at a time.

  Each tile holds all S keys for `chunk` queries of `group` (batch, head) pairs, so its softmax is
  exact (no online rescaling); scores and probabilities are float32. The backward pass recomputes the
  probabilities from the saved log-sum-exp (as flash attention does) instead of storing [B, N, T, S].
  """
  b, t, n, dh = q.shape
  # The softmax scale goes on q ([T, Dh]) rather than on every [T, S] score, forward and backward.
  q = q * jnp.asarray(dh ** -0.5, q.dtype)
  # [B, T, N, Dh] -> [B*N, T, Dh]
  qp, kp, vp = (jnp.swapaxes(x, 1, 2).reshape(b * n, x.shape[1], dh) for x in (q, k, v))
  out = _tiled_attention(qp, kp, vp, tile_elements)
  return jnp.swapaxes(out.reshape(b, n, t, dh), 1, 2)  # [B, T, N, Dh]


def _largest_divisor(n: int, limit: int) -> int:
  limit = max(1, min(n, limit))
  return max(d for d in range(1, limit + 1) if n % d == 0)


def _tiling(num_pairs: int, tq: int, tk: int, tile_elements: int) -> tuple[int, int]:
  """(pairs per tile, queries per tile) so that a tile's [group, chunk, S] scores fit `tile_elements`."""
  chunk = _largest_divisor(tq, tile_elements // tk)
  group = _largest_divisor(num_pairs, tile_elements // (chunk * tk)) if chunk == tq else 1
  return group, chunk


def _to_tiles(x, group: int, chunk: int):  # [P, T, Dh] -> [P/g, T/c, g, c, Dh]
  p, t, dh = x.shape
  return x.reshape(p // group, group, t // chunk, chunk, dh).transpose(0, 2, 1, 3, 4)


def _from_tiles(x):  # [P/g, T/c, g, c, Dh] -> [P, T, Dh]
  pg, tc, g, c, dh = x.shape
  return x.transpose(0, 2, 1, 3, 4).reshape(pg * g, tc * c, dh)


# q arrives scaled by 1/sqrt(Dh) (tiled_attention), so the tiles compute softmax(q k^T) v.
def _tile_forward(q, k, v):  # [g, c, Dh], [g, S, Dh] -> out [g, c, Dh], log-sum-exp [g, c, 1]
  s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
  return out.astype(q.dtype), m + jnp.log(denom)


def _tile_backward(q, k, v, out, lse, d_out):  # -> dq [g, c, Dh], dk^T and dv^T [g, Dh, S] (float32)
  p = jnp.exp(jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32) - lse)
  # dk^T and dv^T rather than dk and dv: the [c, S] matrix then sits on the right of the product, in
  # the layout the CPU matmul kernels take directly (the transposed form is much slower).
  dv_t = jnp.einsum("gqd,gqk->gdk", d_out, p.astype(d_out.dtype), preferred_element_type=jnp.float32)
  dp = jnp.einsum("gqd,gkd->gqk", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("gqk,gkd->gqd", ds, k, preferred_element_type=jnp.float32)
  dk_t = jnp.einsum("gqd,gqk->gdk", q, ds, preferred_element_type=jnp.float32)
  return dq, dk_t, dv_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_attention(q, k, v, tile_elements):  # [P, T, Dh], [P, S, Dh] -> [P, T, Dh]
  return _tiled_attention_fwd(q, k, v, tile_elements)[0]


def _tiled_attention_fwd(q, k, v, tile_elements):
  group, chunk = _tiling(q.shape[0], q.shape[1], k.shape[1], tile_elements)
  k_groups, v_groups = (x.reshape(-1, group, *x.shape[1:]) for x in (k, v))  # [P/g, g, S, Dh]

  def per_group(args):
    q_chunks, k_group, v_group = args
    return jax.lax.map(lambda q_chunk: _tile_forward(q_chunk, k_group, v_group), q_chunks)

  out, lse = jax.lax.map(per_group, (_to_tiles(q, group, chunk), k_groups, v_groups))
  return _from_tiles(out), (q, k, v, out, lse)


def _tiled_attention_bwd(tile_elements, residuals, d_out):
  q, k, v, out, lse = residuals
  group, chunk = _tiling(q.shape[0], q.shape[1], k.shape[1], tile_elements)
  k_groups, v_groups = (x.reshape(-1, group, *x.shape[1:]) for x in (k, v))

  def per_group(args):
    q_chunks, k_group, v_group, out_chunks, lse_chunks, d_out_chunks = args

    def per_chunk(acc, chunk_args):  # accumulates dk^T, dv^T over the query chunks
      q_chunk, out_chunk, lse_chunk, d_out_chunk = chunk_args
      dq, dk_t, dv_t = _tile_backward(q_chunk, k_group, v_group, out_chunk, lse_chunk, d_out_chunk)
      return (acc[0] + dk_t, acc[1] + dv_t), dq

    zeros = jnp.zeros((group, k.shape[-1], k.shape[1]), jnp.float32)  # [g, Dh, S]
    (dk_t, dv_t), dq = jax.lax.scan(per_chunk, (zeros, zeros), (q_chunks, out_chunks, lse_chunks, d_out_chunks))
    return dq, dk_t, dv_t

  dq, dk_t, dv_t = jax.lax.map(per_group, (_to_tiles(q, group, chunk), k_groups, v_groups, out, lse,
                                           _to_tiles(d_out, group, chunk)))
  dk = jnp.swapaxes(dk_t, -1, -2).reshape(k.shape)  # [P/g, g, Dh, S] -> [P, S, Dh]
  dv = jnp.swapaxes(dv_t, -1, -2).reshape(v.shape)
  return _from_tiles(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_tiled_attention.defvjp(_tiled_attention_fwd, _tiled_attention_bwd)


class Attention(nn.Module):
  """Multi-head (cross-)attention with to_q/to_k/to_v/to_out_0 projections (dropout after to_out_0)."""
  heads: int
  dim_head: int
  qkv_bias: bool = False
  dropout: float = 0.0
  attention: str = "xla"  # how the scores run: one of IMPLEMENTATIONS
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
    out = multi_head_attention(q, k, v, self.heads, implementation=self.attention)
    out = Dense(x.shape[-1], name="to_out_0", **kw)(out)
    return nn.Dropout(self.dropout, deterministic=deterministic)(out)


class GEGLU(nn.Module):
  """Gated GELU (Shazeer 2020): one projection to 2*inner, value * gelu(gate)."""
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, C] -> [B, T, inner]
    value, gate = SplitDense(self.inner_dim, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return value * gelu(gate)


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


class _FeedForwardChunk(FeedForward):
  """The feed-forward on one chunk of rows, with the signature `nn.scan` calls: (carry, x) -> (carry, y)."""
  deterministic: bool = True

  def __call__(self, carry, x):  # None, [rows, C] -> None, [rows, C]
    return carry, super().__call__(x, self.deterministic)


def _ff_chunk_rows(rows: int, inner: int, chunk_elements: int) -> int:
  """Rows per feed-forward chunk whose [rows, 2 x inner] activations hold about `chunk_elements`
  (`rows`: in one piece, as with `chunk_elements` 0 or chunks too small to pay for the loop)."""
  refuse_auto("the feed-forward", ff_chunk_elements=chunk_elements)
  if chunk_elements <= 0:
    return rows
  chunk = _largest_divisor(rows, chunk_elements // (2 * inner))
  return chunk if _MIN_FF_CHUNK_ROWS <= chunk < rows else rows


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward; residual after each."""
  heads: int
  dim_head: int
  dropout: float = 0.0
  attention: str = "xla"  # how the scores run: one of IMPLEMENTATIONS
  # The feed-forward over chunks of rows whose GEGLU activations hold about this many elements, each
  # chunk's recomputed in the backward pass (0: in one piece).
  ff_chunk_elements: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):  # [B, T, C], [B, L, D] -> [B, T, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, dim_head=self.dim_head, dropout=self.dropout, attention=self.attention, **kw)
    x = x + Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x), None, deterministic)
    x = x + Attention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context, deterministic)
    return x + self._feed_forward(LayerNorm(name="norm3", **kw)(x), deterministic)

  def _feed_forward(self, x, deterministic):  # [B, T, C] -> [B, T, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, c = x.shape
    chunk = _ff_chunk_rows(b * t, c * FeedForward.mult, self.ff_chunk_elements)
    if chunk == b * t:
      return FeedForward(dropout=self.dropout, name="ff", **kw)(x, deterministic)
    # A loop over chunks of rows, the parameters shared (same names and shapes as FeedForward's), each
    # chunk's activations recomputed in the backward pass.
    chunks = nn.scan(nn.remat(_FeedForwardChunk), variable_broadcast="params",
                     split_rngs={"params": False, "dropout": True}, length=b * t // chunk)
    _, y = chunks(dropout=self.dropout, deterministic=deterministic, name="ff", **kw)(
        None, x.reshape(b * t // chunk, chunk, c))
    return y.reshape(b, t, c)


class SpatialTransformer(nn.Module):
  """GroupNorm, project in (1x1 conv or linear), transformer blocks over H*W tokens, project out, residual."""
  heads: int
  dim_head: int
  depth: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  dropout: float = 0.0
  remat: bool = False
  attention: str = "xla"  # TransformerBlock's
  ff_chunk_elements: int = 0  # TransformerBlock's
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
      block = block_cls(self.heads, self.dim_head, self.dropout, self.attention, self.ff_chunk_elements,
                        name=f"transformer_blocks_{i}", **kw)
      x = block(x, context, deterministic)
    if self.use_linear_projection:
      x = Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
    else:
      x = Conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
    return x + residual
